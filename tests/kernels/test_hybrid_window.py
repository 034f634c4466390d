"""``hybrid_window`` backends against the naive reference: prefill and decode shapes, any slot order,
GQA, padding, sinks; the naive reference against the formula written out. Triton runs on CPU under
``TRITON_INTERPRET=1`` (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels import hybrid_window as op
from headwise.kernels.hybrid_window import naive
from headwise.kernels.sink_window import sink_window_attention
from tests.grids import grid
from tests.kernels.cases import TOLERANCE, Case, backend_params, decode_case, prefill_case, triton_marks
from tests.kernels.test_lightning import backends
from tests.kernels.test_sink_window import scrambled

LENGTHS = [1, 15, 63, 130]
GQA = [1, 3]
SINKS = [0, 4]


def linear_part(q: torch.Tensor, seed: int = 0, zero_rows: bool = True):
    """Random ``(lin_num [B, H, Q, D], lin_den [B, H, Q])`` with ``lin_den >= 0`` (some rows 0, as
    before any key has left the window)."""
    g = torch.Generator().manual_seed(seed + 7)
    num = torch.randn(q.shape, generator=g)
    den = 3 * torch.rand(q.shape[:-1], generator=g)
    if zero_rows:
        den[..., ::4] = 0.0
        num[..., ::4, :] = 0.0
    return num, den


def check(backend: str, case: Case, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    num, den = linear_part(case.q, seed)
    expected = naive.hybrid_window_attention(*case.args(), num, den)
    got = op.hybrid_window_attention(*case.args(), num, den, backend=backend)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])
    padding_rows = (case.q_pos < 0)[:, None, :, None].expand_as(got)
    assert (got[padding_rows] == 0).all(), "padding queries must give zeros"
    return got


@pytest.mark.parametrize(*grid({"backend": backends(), "length": LENGTHS, "gqa": GQA, "sink": SINKS,
                               "window": ["win_lt", "win_gt"], "padding": ["left", "right"]},
                              labels={"length": "len"}, marks=triton_marks))
def test_prefill_backend_equals_naive(backend, length, gqa, sink, window, padding):
    check(backend, prefill_case(length, gqa, sink, window, padding, torch.float32))


@pytest.mark.parametrize(*grid({"backend": backends(), "queries": [1, 16, 17, 70]},
                               labels={"queries": lambda q: f"last{q}q"}, marks=triton_marks))
def test_any_slot_order_and_prompt_chunks(backend, queries):
    """Scrambled per-head slots (a ring-written cache) with the last ``queries`` queries of 200 tokens."""
    check(backend, scrambled(prefill_case(200, 3, 4, "win_lt", "right", torch.float32, queries=queries)))


@pytest.mark.parametrize(*grid({"backend": backends(), "length": [15, 130], "gqa": GQA}, labels={"length": "len"},
                              marks=triton_marks))
def test_decode_over_a_ring_cache(backend, length, gqa):
    """One query per sequence over a scrambled ring cache, an idle batch row (q_pos -1)."""
    q, k, v, q_pos, k_pos, sink, span, scale = decode_case(length, gqa, 4, "win_lt", torch.float32)
    check(backend, Case(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale))


@pytest.mark.parametrize("backend", ["cpu"])
def test_bf16_inputs(backend):
    case = prefill_case(130, 3, 4, "win_lt", "left", torch.bfloat16)
    check(backend, case, torch.bfloat16)


@pytest.mark.parametrize("backend", backend_params(["naive", *backends()]))
def test_without_linear_mass_it_is_sink_window_attention(backend):
    case = prefill_case(130, 3, 4, "win_lt", "left", torch.float32)
    zeros = torch.zeros_like(case.q), torch.zeros(case.q.shape[:-1])
    got = op.hybrid_window_attention(*case.args(), *zeros, backend=backend)
    torch.testing.assert_close(got, sink_window_attention(*case.args(), backend="naive"), **TOLERANCE[torch.float32])


def test_naive_equals_the_formula_written_out():
    """One query head, no padding: ``(sum exp(a - m) v + N) / (sum exp(a - m) + d)`` over sink + window."""
    case = prefill_case(40, 1, 3, "win_lt", "left", torch.float32, batch=1, Hkv=1)
    case.span = torch.full_like(case.span, 7)
    num, den = linear_part(case.q, 3)
    got = naive.hybrid_window_attention(*case.args(), num, den)
    q, k, v = case.q[0, 0], case.k[0, 0], case.v[0, 0]
    for t in range(40):
        keys = [s for s in range(t + 1) if s < 3 or s > t - 7]
        a = torch.stack([q[t] @ k[s] for s in keys]) * case.scale
        w = torch.exp(a - a.max())
        expected = (sum(wi * v[s] for wi, s in zip(w, keys)) + num[0, 0, t]) / (w.sum() + den[0, 0, t])
        torch.testing.assert_close(got[0, 0, t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params(["naive", *backends()]))
def test_no_exact_key_in_reach_gives_the_linear_part_alone(backend):
    """Queries far past every key with no sink and a window of 2: the output is ``lin_num / lin_den``."""
    case = prefill_case(64, 1, 0, "win_lt", "left", torch.float32, batch=1)
    case.q_pos = case.q_pos + 1000
    case.span = torch.full_like(case.span, 2)
    num, den = linear_part(case.q, 5)
    got = op.hybrid_window_attention(*case.args(), num, den, backend=backend)
    expected = torch.where(den[..., None] > 0, num / den.clamp(min=1e-30)[..., None], 0.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
