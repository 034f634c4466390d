"""``sink_window`` backends against the naive reference (prefill shapes, any slot order, GQA, padding)."""

from __future__ import annotations

import itertools

import pytest
import torch

from headwise.kernels import pick_backend
from headwise.kernels import sink_window as op
from headwise.kernels.sink_window import naive
from tests.grids import grid
from tests.kernels.cases import TOLERANCE, WINDOWS, Case, prefill_case

SHORT_LENGTHS = [1, 63, 64, 65]
GQA = [1, 3, 4]
SINKS = [0, 4, 64]
LEN = {"length": "len"}


def check(backend: str, case: Case, dtype: torch.dtype) -> None:
    expected = naive.sink_window_attention(*case.args())
    got = op.sink_window_attention(*case.args(), backend=backend)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])
    padding_rows = (case.q_pos < 0)[:, None, :, None].expand_as(got)
    assert (got[padding_rows] == 0).all(), "padding queries must give zeros"


def mid_length_cases() -> set[tuple]:
    """Length 1000: every GQA ratio x sink with the small window, plus one other window each (the full
    product is slow), as ``(gqa, sink, window, padding)``."""
    cases = []
    for j, (gqa, sink) in enumerate(itertools.product(GQA, SINKS)):
        for window in dict.fromkeys(["win_lt", list(WINDOWS)[j % 3]]):
            cases.append((gqa, sink, window, ("left", "right")[len(cases) % 2]))
    return set(cases)


MID = mid_length_cases()


@pytest.mark.parametrize(*grid(
    {"length": [*SHORT_LENGTHS, 1000], "gqa": GQA, "sink": SINKS, "window": WINDOWS, "padding": ["left", "right"]},
    where=lambda length, **rest: length != 1000 or tuple(rest.values()) in MID, labels=LEN))
def test_cpu_prefill_fp32(length, gqa, sink, window, padding):
    check("cpu", prefill_case(length, gqa, sink, window, padding, torch.float32), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("length,gqa,sink,window,padding", [
    pytest.param(4097, 3, 64, "win_lt", "left", id="len4097-gqa3-sink64-win_lt-left"),
    pytest.param(4097, 3, 4, "win_eq", "right", id="len4097-gqa3-sink4-win_eq-right"),
    pytest.param(4097, 4, 0, "win_gt", "left", id="len4097-gqa4-sink0-win_gt-left"),
])
def test_cpu_prefill_long(length, gqa, sink, window, padding):
    """4097 tokens (uneven last query block, several band blocks); one KV head pair keeps the reference quick."""
    check("cpu", prefill_case(length, gqa, sink, window, padding, torch.float32, batch=2, Hkv=2, D=16), torch.float32)


@pytest.mark.parametrize(*grid({"length": [63, 1000], "gqa": [3], "sink": [4], "window": WINDOWS,
                               "padding": ["left", "right"]}, labels=LEN))
def test_cpu_prefill_bf16(length, gqa, sink, window, padding):
    check("cpu", prefill_case(length, gqa, sink, window, padding, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize(*grid({"queries": [17, 300], "padding": ["left", "right"]},
                               labels={"queries": lambda q: f"last{q}q"}))
def test_cpu_prompt_chunk_after_cached_keys(queries, padding):
    """A later prompt chunk: queries are the last ``queries`` positions, earlier keys already there."""
    check("cpu", prefill_case(1000, 3, 4, "win_lt", padding, torch.float32, queries=queries), torch.float32)


@pytest.mark.parametrize("sink,span", [(4, 300), (0, 300), (64, 96)],
                         ids=["sink4-span300", "sink0-span300", "sink64-span96"])
def test_cpu_chunk_after_a_ring_keeps_the_band_path(sink, span, monkeypatch):
    """A prompt's next chunk after a window head's ring (sink + the last ``span`` keys kept, in ring order,
    older keys dropped): the band blocks still run batched (``_band_blocks``), not masked one by one."""
    from headwise.kernels.sink_window import cpu

    g = torch.Generator().manual_seed(3)
    C, n, G, D = 1500, 1000, 3, 16
    kept = [*range(sink), *range(C - span, C)]
    ring = kept[:sink] + kept[sink:][117 % span:] + kept[sink:][:117 % span]        # rotated, as a ring writes
    k_pos = torch.tensor(ring + [-1] * 5 + list(range(C, C + n)))[None, None]       # [1, 1, S] with empty slots
    S = k_pos.shape[-1]
    case = Case(torch.randn(1, G, n, D, generator=g), torch.randn(1, 1, S, D, generator=g),
                torch.randn(1, 1, S, D, generator=g), torch.arange(C, C + n)[None], k_pos,
                torch.tensor([sink]), torch.tensor([[span]]), D ** -0.5)
    masked = []
    block = cpu._masked_block
    monkeypatch.setattr(cpu, "_masked_block", lambda q, *a: masked.append(q.shape[2]) or block(q, *a))
    check("cpu", case, torch.float32)
    size = cpu.band_block(span, cpu.QUERY_BLOCK)
    assert sum(masked) < size                      # only the last, partial block


def test_key_layout_finds_head_and_tail_runs():
    from headwise.kernels.sink_window.cpu import PAST_END, _KeyLayout

    sorted_row = torch.tensor([-1, -1, 0, 1, 2, 3, 10, 11, 12, 13, 14, PAST_END])
    layout = _KeyLayout.of(sorted_row)
    assert (layout.count, layout.head_slot, layout.head_pos, layout.head_len) == (9, 2, 0, 4)
    assert (layout.tail_slot, layout.tail_pos, layout.last_pos) == (6, 10, 14)
    assert layout.holds_band(12, 13, 4, 3) and not layout.holds_band(12, 13, 4, 4)    # window from 10 / from 9
    assert not layout.holds_band(12, 13, 5, 3)                                         # sink of 5: position 4 is gone
    whole = _KeyLayout.of(torch.arange(6))
    assert whole.contiguous_from_zero and whole.tail_pos == 0 and _KeyLayout.of(torch.tensor([-1])).count == 0


def scrambled(case: Case, seed: int = 0) -> Case:
    """The same attention with every KV head's slots in its own random order (``k_pos [B, Hkv, S]``)."""
    g = torch.Generator().manual_seed(seed)
    B, Hkv, S, D = case.k.shape
    order = torch.stack([torch.randperm(S, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, S)
    index = order[..., None].expand(-1, -1, -1, D)
    k_pos = case.k_pos.expand(B, Hkv, S).gather(2, order)
    return Case(case.q, case.k.gather(2, index), case.v.gather(2, index), case.q_pos, k_pos, case.sink,
                case.span, case.scale)


@pytest.mark.parametrize(*grid({"queries": [1, 16, 17, 200], "window": WINDOWS}, labels={"queries": lambda q: f"{q}q"}))
def test_cpu_any_slot_order(queries, window):
    """Slots in per-head random order (a ring-written cache): the direct path and the sorting path."""
    check("cpu", scrambled(prefill_case(300, 3, 4, window, "right", torch.float32, queries=queries)), torch.float32)


def test_cpu_per_head_positions_that_agree():
    """``k_pos [B, Hkv, S]`` with equal rows, what a fresh headwise cache passes at prefill."""
    case = prefill_case(200, 3, 4, "win_lt", "left", torch.float32)
    B, Hkv, S, _ = case.k.shape
    check("cpu", Case(*case.args()[:4], case.k_pos.expand(B, Hkv, S).clone(), case.sink, case.span, case.scale),
          torch.float32)


@pytest.mark.parametrize("span,sink", [(33, 4), (48, 64), (70, 0), (129, 64), (256, 4)],
                         ids=lambda x: str(x))
def test_cpu_short_windows_run_smaller_band_blocks(span, sink):
    """Windows of 33..256 run band blocks of the largest power of two below the span (``band_block``),
    batched, mask-free; the last block is uneven (600 queries)."""
    from headwise.kernels.sink_window import cpu

    block = cpu.band_block(span, cpu.QUERY_BLOCK)
    assert block < span and block & (block - 1) == 0 and block >= cpu.MIN_BAND_BLOCK
    case = prefill_case(600, 3, 0, "win_lt", "right", torch.float32)
    case.span = torch.full_like(case.span, span)
    case.sink = torch.full_like(case.sink, sink)
    check("cpu", case, torch.float32)


@pytest.mark.parametrize("span,sink", [(1, 0), (1, 500), (2, 3)], ids=["self-only", "sink-beyond-length", "tiny"])
def test_cpu_edge_spans(span, sink):
    case = prefill_case(130, 3, 0, "win_lt", "left", torch.float32)
    case.span = torch.full_like(case.span, span)
    case.sink = torch.full_like(case.sink, sink)
    check("cpu", case, torch.float32)


def test_cpu_query_with_no_visible_key_gets_zeros():
    """A query past every cached key with an empty sink and a window that misses them all."""
    case = prefill_case(64, 1, 0, "win_lt", "left", torch.float32, batch=1)
    case.q_pos = case.q_pos + 1000
    case.span = torch.full_like(case.span, 2)
    got = op.sink_window_attention(*case.args(), backend="cpu")
    assert (got == 0).all()


def test_auto_picks_cpu_for_cpu_tensors():
    picked = pick_backend("sink_window", op.BACKENDS, op.AUTO_ORDER, "auto", torch.device("cpu"))
    assert picked is op.BACKENDS["cpu"]


def test_unknown_backend_is_refused():
    case = prefill_case(8, 1, 0, "win_lt", "left", torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        op.sink_window_attention(*case.args(), backend="fast")
