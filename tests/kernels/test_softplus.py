"""``softplus`` op: every backend equals the naive reference over a shape grid (prefill and ring-cache
decode, GQA, left/right padding, sinks and windows), the reference equals the paper's formulas
written out, and ``exp`` without re-weighting is softmax. Triton runs under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from headwise import kernels
from headwise.kernels import softplus as op
from headwise.kernels.sink_window import naive as softmax_naive
from headwise.kernels.softplus import HeadParams, naive
from tests.grids import grid
from tests.kernels.cases import TOLERANCE, backend_params, decode_case, prefill_case, triton_marks

LENGTHS = [1, 15, 63, 130]
GQA = [1, 3]


def params(*heads: tuple[str, str, float, float]) -> HeadParams:
    """Per-head ``(nonlinearity, scale rule, temperature, power)``; the log rules are relative to 16 tokens."""
    rules = {"none": (0.0, 0.0), "log": (math.log(16), 0.0), "log_floor": (math.log(16), 1.0)}
    return HeadParams(
        softplus=torch.tensor([h[0] == "softplus" for h in heads]),
        temperature=torch.tensor([h[2] for h in heads], dtype=torch.float32),
        log_ref=torch.tensor([rules[h[1]][0] for h in heads], dtype=torch.float32),
        log_floor=torch.tensor([rules[h[1]][1] for h in heads], dtype=torch.float32),
        power=torch.tensor([h[3] for h in heads], dtype=torch.float32))


#: Two KV heads each: readable ids for the grid.
VARIANTS = {
    "softmax": params(("exp", "none", 1.0, 0.0), ("exp", "none", 1.0, 0.0)),
    "lssa": params(("softplus", "log", 1.0, 0.0), ("softplus", "none", 1.3, 0.0)),
    "lssar-p3": params(("softplus", "log_floor", 1.0, 3.0), ("softplus", "log", 0.8, 3.0)),
    "exp-reweight-p15": params(("exp", "log_floor", 1.0, 15.0), ("exp", "none", 1.0, 15.0)),
    "mixed": params(("exp", "log", 1.2, 0.0), ("softplus", "log_floor", 1.0, 8.0)),
}
#: Re-weighting raises each weight ratio to the power p, so fp32 summation-order differences grow
#: about p times; without it the sink_window tolerance holds.
TOL = {0: TOLERANCE[torch.float32], 1: dict(atol=1e-4, rtol=1e-4)}


def tolerance(p: HeadParams) -> dict:
    return TOL[int(bool((p.power > 0).any()))]


def backends():
    names = ["cpu"]
    try:
        import triton  # noqa: F401
        from triton import language as tl
        if type(tl.zeros).__name__ == "InterpretedFunction" or torch.cuda.is_available():
            names.append("triton")
    except ImportError:
        pass
    return names


def interpreter_keeps(backend, length, variant, **_) -> bool:
    """The Triton interpreter is slow: short lengths, and "mixed" (both nonlinearities, p = 0 and p > 0)
    plus "lssar-p3" at one length."""
    return backend != "triton" or (length <= 63 and (variant == "mixed" or (variant == "lssar-p3" and length == 15)))


@pytest.mark.parametrize(*grid(
    {"backend": backends(), "length": LENGTHS, "gqa": GQA, "padding": ["left", "right"], "sink": [0, 4],
     "window": ["win_eq", "win_lt"], "variant": VARIANTS},
    where=lambda sink, window, **rest: (sink == 0) == (window == "win_eq") and interpreter_keeps(**rest),
    labels={"length": "len"}, marks=triton_marks))
def test_prefill_backend_equals_naive(backend, length, gqa, padding, sink, window, variant):
    case = prefill_case(length, gqa, sink, window, padding, torch.float32)
    p = VARIANTS[variant]
    expected = naive.softplus_attention(*case.args(), p)
    got = op.softplus_attention(*case.args(), p, backend=backend)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, **tolerance(p))
    assert (got[(case.q_pos < 0)[:, None, :, None].expand_as(got)] == 0).all(), "padding queries must give zeros"


@pytest.mark.parametrize(*grid({"backend": backends(), "length": [1, 63, 130], "variant": ["softmax", "lssar-p3", "mixed"]},
                               labels={"length": "len"}, marks=triton_marks))
def test_decode_over_ring_cache_equals_naive(backend, length, variant):
    """One query per sequence over kept keys in scrambled slot order, stale keys included, an idle row."""
    q, k, v, q_pos, k_pos, sink, span, scale = decode_case(length, 3, 4, "win_lt", torch.float32)
    p = VARIANTS[variant]
    expected = naive.softplus_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale, p)
    got = op.softplus_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale, p, backend=backend)
    torch.testing.assert_close(got, expected, **tolerance(p))
    assert (got[q_pos < 0] == 0).all(), "idle batch rows must give zeros"


def test_chunk_after_cached_keys_and_bf16():
    """A later prompt chunk (the last queries over all keys) and bf16 inputs on the cpu backend."""
    case = prefill_case(130, 3, 4, "win_lt", "left", torch.bfloat16, queries=17)
    p = VARIANTS["mixed"]
    expected = naive.softplus_attention(*case.args(), p)
    got = op.softplus_attention(*case.args(), p, backend="cpu")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("variant", ["mixed", "lssar-p3", "softmax"])
def test_cpu_query_blocks_do_not_change_the_result(variant):
    case = prefill_case(130, 3, 4, "win_gt", "right", torch.float32)
    p = VARIANTS[variant]
    whole = op.cpu.softplus_attention(*case.args(), p, query_block=512)
    torch.testing.assert_close(op.cpu.softplus_attention(*case.args(), p, query_block=16), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(["naive", *backends()]))
def test_exp_without_reweighting_is_softmax(backend):
    """``exp``, temperature 1, no length scale, p = 0 is the sink_window (softmax) reference."""
    case = prefill_case(63, 3, 4, "win_lt", "left", torch.float32)
    expected = softmax_naive.sink_window_attention(*case.args())
    got = op.softplus_attention(*case.args(), VARIANTS["softmax"], backend=backend)
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


def written_out(q, k, v, phi, m, p):
    """The paper's steps for one head and causal rows, without the logits trick:
    ``A = phi(m s) / sum phi(m s)``, then ``ReLU(n A - 1)^p`` renormalised. q, k, v ``[T, D]``."""
    T, D = q.shape
    out = torch.empty(T, D, dtype=torch.float64)
    for t in range(T):
        n = t + 1
        s = (q[t].double() @ k[:n].double().T) * D ** -0.5
        e = phi(m(n) * s)
        a = e / e.sum()
        if p > 0 and bool((n * a - 1 > 0).any()):
            r = torch.relu(n * a - 1) ** p
            a = r / r.sum()
        out[t] = a @ v[:n].double()
    return out


@pytest.mark.parametrize("nonlinearity,rule,power", [("softplus", "log", 0.0), ("softplus", "log_floor", 3.0),
                                                     ("exp", "log_floor", 15.0), ("softplus", "none", 1.0)])
def test_reference_equals_the_formulas_written_out(nonlinearity, rule, power):
    g = torch.Generator().manual_seed(3)
    T, D = 40, 16
    q, k, v = (torch.randn(1, 1, T, D, generator=g) * 2 for _ in range(3))
    pos = torch.arange(T)[None]
    p = params((nonlinearity, rule, 1.1, power))
    got = naive.softplus_attention(q, k, v, pos, pos[:, None], torch.zeros(1, dtype=torch.long),
                                   torch.full((1, 1), T), D ** -0.5, p)
    phi = torch.nn.functional.softplus if nonlinearity == "softplus" else torch.exp
    floor = 1.0 if rule == "log_floor" else 0.0
    m = {"none": lambda n: 1.1, "log": lambda n: 1.1 * math.log(n) / math.log(16),
         "log_floor": lambda n: 1.1 * max(floor, math.log(n) / math.log(16))}[rule]
    torch.testing.assert_close(got[0, 0].double(), written_out(q[0, 0], k[0, 0], v[0, 0], phi, m, power),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backend_params(["naive", *backends()]))
def test_reweighting_edge_rows(backend):
    """A row of one key keeps it; a row of equal weights (nothing above 1/n) keeps A; p = 64 over
    1000 keys stays finite and picks the top key."""
    D = 16
    g = torch.Generator().manual_seed(0)
    k = torch.zeros(1, 1, 8, D)                                  # equal scores: uniform rows
    v = torch.randn(1, 1, 8, D, generator=g)
    q = torch.randn(1, 1, 8, D, generator=g)
    pos = torch.arange(8)[None]
    p = params(("softplus", "none", 1.0, 5.0))
    got = op.softplus_attention(q, k, v, pos, pos[:, None], torch.zeros(1, dtype=torch.long),
                                torch.full((1, 1), 8), D ** -0.5, p, backend=backend)
    expected = torch.cumsum(v[0, 0], 0) / torch.arange(1, 9)[:, None]
    torch.testing.assert_close(got[0, 0], expected, atol=1e-5, rtol=1e-5)
    S = 1000
    k = torch.randn(1, 1, S, D, generator=g)
    v = torch.randn(1, 1, S, D, generator=g)
    q = k[:, :, 700:701] * 3                                     # key 700 scores highest by far
    got = op.softplus_attention(q, k, v, torch.tensor([[S - 1]]), torch.arange(S)[None, None],
                                torch.zeros(1, dtype=torch.long), torch.full((1, 1), S), D ** -0.5,
                                params(("exp", "none", 1.0, 64.0)), backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0, 0, 0], v[0, 0, 700], atol=1e-3, rtol=1e-3)


def test_auto_logs_the_backend_and_bad_params_are_refused(caplog):
    case = prefill_case(15, 3, 0, "win_eq", "left", torch.float32)
    kernels._announced.discard(("softplus", "cpu", "cpu"))
    with caplog.at_level(logging.INFO, logger="headwise.kernels"):
        op.softplus_attention(*case.args(), VARIANTS["lssa"])
    assert "softplus: running the cpu backend on cpu" in caplog.text
    with pytest.raises(ValueError, match=r"every HeadParams tensor must have shape \[2\]"):
        op.softplus_attention(*case.args(), params(("exp", "none", 1.0, 0.0)))
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        op.softplus_attention(*case.args(), VARIANTS["lssa"], backend="fast")


@pytest.mark.parametrize(*grid({"backend": backends(), "power": [0.0, 3.0]}, labels={"power": "p"}, marks=triton_marks))
def test_softplus_rows_that_underflow_match_the_reference(power, backend):
    """Every readable score below -104: softplus underflows to 0 in fp32, the cpu path recomputes those
    rows with logits (as the reference does) instead of dividing by zero."""
    g = torch.Generator().manual_seed(5)
    D, S = 16, 20
    k = 1.0 + 0.1 * torch.randn(1, 1, S, D, generator=g)                      # keys near (1, ..., 1)
    v = torch.randn(1, 1, S, D, generator=g)
    q = torch.full((1, 1, S, D), -4.0) + 0.1 * torch.randn(1, 1, S, D, generator=g)   # scores about -4 * 16 / 4 * 8
    pos = torch.arange(S)[None]
    p = params(("softplus", "none", 8.0, power))
    args = (q, k, v, pos, pos[:, None], torch.zeros(1, dtype=torch.long), torch.full((1, 1), S), D ** -0.5, p)
    scores = (q[0, 0] @ k[0, 0].T) * D ** -0.5 * 8.0
    assert float(scores.max()) < -104                                          # softplus(x) == 0 in fp32
    expected = naive.softplus_attention(*args)
    got = op.softplus_attention(*args, backend=backend)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, **TOL[1])    # logits near -130: fp32 ulps of 1e-5
