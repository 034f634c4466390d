"""``routed_attention`` backends against the naive reference: prefill and decode shapes, GQA, padding, routings."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels import routed_attention as op
from headwise.kernels.routed_attention import naive
from headwise.kernels.routed_attention.pack import GROUP_ROWS_MAX_QUERIES
from tests.grids import grid, listed
from tests.kernels.cases import TOLERANCE, decode_case, prefill_case
from tests.kernels.test_sink_window import scrambled
from tests.kernels.test_triton_kernels import runs_here

ROUTINGS = ("all", "none", "half", "group_off")
LEN = {"length": "len"}


def routing(name: str, B: int, H: int, Q: int, gqa: int, seed: int = 0) -> torch.Tensor:
    """``[B, H, Q]`` active pairs: all, none, a random half, or random with KV head 0's whole group off."""
    g = torch.Generator().manual_seed(seed + 7)
    if name == "all":
        return torch.ones(B, H, Q, dtype=torch.bool)
    if name == "none":
        return torch.zeros(B, H, Q, dtype=torch.bool)
    active = torch.rand(B, H, Q, generator=g) < 0.5
    if name == "group_off":
        active[:, :gqa] = False
    return active


def check(backend: str, args: tuple, active: torch.Tensor, dtype: torch.dtype) -> None:
    expected = naive.routed_attention(*args, active)
    got = op.routed_attention(*args, active, backend=backend)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])
    assert (got[~active] == 0).all(), "inactive pairs must give zeros"


@pytest.mark.parametrize(*grid({"length": [1, 15, 63, 130], "gqa": [1, 3], "sink": [0, 4], "window": ["win_lt", "win_gt"],
                               "padding": ["left", "right"], "name": ROUTINGS}, labels=LEN))
def test_cpu_prefill(length, gqa, sink, window, padding, name):
    case = prefill_case(length, gqa, sink, window, padding, torch.float32)
    active = routing(name, case.q.shape[0], case.q.shape[1], case.q.shape[2], gqa)
    check("cpu", case.args(), active, torch.float32)


@pytest.mark.parametrize(*grid({"queries": [17, 90], "name": ROUTINGS}, labels={"queries": lambda q: f"last{q}q"}))
def test_cpu_prompt_chunk_over_scrambled_cache(queries, name):
    """A later chunk over a cache in any slot order, with per-head key positions."""
    case = scrambled(prefill_case(200, 3, 4, "win_lt", "right", torch.float32, queries=queries))
    active = routing(name, *case.q.shape[:3], 3)
    check("cpu", case.args(), active, torch.float32)


@pytest.mark.parametrize(*grid({"length": [1, 15, 130], "gqa": [1, 3], "sink": [0, 4], "window": ["win_lt", "win_eq"],
                               "name": ROUTINGS}, labels=LEN))
def test_cpu_decode_over_ring_cache(length, gqa, sink, window, name):
    """One query per sequence over a ring-ordered cache (an idle batch row at the end)."""
    q, k, v, q_pos, k_pos, sink_t, span, scale = decode_case(length, gqa, sink, window, torch.float32)
    active = routing(name, q.shape[0], q.shape[1], 1, gqa)
    check("cpu", (q[:, :, None], k, v, q_pos[:, None], k_pos, sink_t, span, scale), active, torch.float32)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_cpu_bf16(padding):
    case = prefill_case(63, 3, 4, "win_lt", padding, torch.bfloat16)
    check("cpu", case.args(), routing("half", *case.q.shape[:3], 3), torch.bfloat16)


def test_a_routed_out_group_is_not_read(monkeypatch):
    """Decode: a KV head with every query head routed out for a sequence is not passed to the kernel;
    prefill: the kernel sees only the active tokens of each query head."""
    from headwise.kernels.routed_attention import cpu, pack

    seen = []
    real = cpu.sink_window_cpu.sink_window_attention

    def spy(q, k, *args):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, *args)

    monkeypatch.setattr(cpu.sink_window_cpu, "sink_window_attention", spy)
    q, k, v, q_pos, k_pos, sink_t, span, scale = decode_case(40, 3, 0, "win_eq", torch.float32, batch=2)
    active = torch.zeros(2, 6, 1, dtype=torch.bool)
    active[0, 1] = True                               # sequence 0 reads KV head 0; nobody reads KV head 1
    check("cpu", (q[:, :, None], k, v, q_pos[:, None], k_pos, sink_t, span, scale), active, torch.float32)
    assert [s for s in seen] == [((1, 3, 1, 16), (1, 1, k.shape[2], 16))]
    seen.clear()
    case = prefill_case(2 * GROUP_ROWS_MAX_QUERIES + 9, 3, 0, "win_eq", "right", torch.float32, batch=1)
    active = torch.zeros(*case.q.shape[:3], dtype=torch.bool)
    active[0, 2, ::5] = True                          # query head 2 (KV head 0) at every fifth token
    check("cpu", case.args(), active, torch.float32)
    assert seen == [((1, 1, int(active.sum()), 16), (1, 1, case.k.shape[2], 16))]
    assert pack.GROUP_ROWS_MAX_QUERIES == GROUP_ROWS_MAX_QUERIES


def test_active_must_be_a_bool_mask_of_the_query_shape():
    case = prefill_case(15, 3, 0, "win_lt", "left", torch.float32)
    with pytest.raises(ValueError, match="active must be a bool tensor"):
        op.routed_attention(*case.args(), torch.ones(case.q.shape[:3]), backend="cpu")


TRITON_CASES = [(15, 3, 4, "win_lt", "left", "half"), (63, 1, 0, "win_gt", "right", "group_off"),
                (130, 3, 0, "win_lt", "right", "half"), (1, 3, 4, "win_eq", "left", "all")]


@runs_here
@pytest.mark.triton
@pytest.mark.parametrize(*listed(["length", "gqa", "sink", "window", "padding", "name"], TRITON_CASES, labels=LEN))
def test_triton_prefill(length, gqa, sink, window, padding, name):
    case = prefill_case(length, gqa, sink, window, padding, torch.float32, batch=2)
    check("triton", case.args(), routing(name, *case.q.shape[:3], gqa), torch.float32)


@runs_here
@pytest.mark.triton
@pytest.mark.parametrize(*grid({"name": ["half", "group_off"]}))
def test_triton_decode(name):
    q, k, v, q_pos, k_pos, sink_t, span, scale = decode_case(63, 3, 4, "win_lt", torch.float32)
    active = routing(name, q.shape[0], q.shape[1], 1, 3)
    check("triton", (q[:, :, None], k, v, q_pos[:, None], k_pos, sink_t, span, scale), active, torch.float32)
