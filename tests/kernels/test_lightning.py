"""``lightning`` op: every backend equals the naive recurrence; chunked prefill + per-token decode
equals one full pass; the state alone (``lightning_state``) equals the recurrence's. Triton runs on
CPU under ``TRITON_INTERPRET=1`` (set by tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels import lightning as op
from tests.grids import grid
from tests.kernels.cases import triton_marks

LENGTHS = [1, 15, 63, 130]
GQA = [1, 3]


def case(T: int, gqa: int, padding: str, batch: int = 3, Hkv: int = 2, F: int = 10, E: int = 17, seed: int = 0,
         with_state: bool = True):
    """Feature-like inputs (positive q/k), per-token log decay, padding rows with zero k and zero decay."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, Hkv * gqa, T, F, generator=g)
    k = torch.rand(batch, Hkv, T, F, generator=g)
    v = torch.randn(batch, Hkv, T, E, generator=g)
    log_decay = -0.3 * torch.rand(batch, Hkv, T, generator=g)
    for b in range(1, batch):                     # row b has b * T // (2 * batch) padding tokens
        pad = b * T // (2 * batch)
        where = slice(0, pad) if padding == "left" else slice(T - pad, T)
        k[b, :, where] = 0.0
        log_decay[b, :, where] = 0.0
    state = torch.randn(batch, Hkv, F, E, generator=g) if with_state else None
    return q, k, v, log_decay, state


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


@pytest.mark.parametrize(*grid({"backend": backends(), "T": LENGTHS, "gqa": GQA, "padding": ["left", "right"]},
                               marks=triton_marks))
def test_backend_equals_naive(backend, T, gqa, padding):
    if backend == "triton" and T > 63:
        T = 63                                     # the interpreter is slow; 63 still spans several blocks
    args = case(T, gqa, padding)
    ref_out, ref_state = op.lightning_attention(*args, backend="naive")
    out, state = op.lightning_attention(*args, backend=backend)
    assert out.shape == ref_out.shape and state.shape == ref_state.shape
    assert torch.allclose(out, ref_out, atol=1e-4, rtol=1e-4)
    assert torch.allclose(state, ref_state, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(*grid({"T": LENGTHS, "padding": ["left", "right"], "with_state": [True, False]},
                               labels={"with_state": "state"}))
def test_state_alone_equals_the_recurrence(T, padding, with_state):
    """``lightning_state`` (no outputs) ends with the naive recurrence's state."""
    q, k, v, g, state = case(T, 1, padding, with_state=with_state)
    _, ref_state = op.lightning_attention(q, k, v, g, state, backend="naive")
    assert torch.allclose(op.lightning_state(k, v, g, state), ref_state, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["cpu", "naive"])
def test_without_initial_state_and_bf16_inputs(backend):
    q, k, v, g, _ = case(40, 3, "left", with_state=False)
    ref_out, ref_state = op.lightning_attention(q, k, v, g, None, backend="naive")
    out, state = op.lightning_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, None, backend=backend)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref_out, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize(*grid({"backend": backends(), "cuts": [[7, 20], [1, 2, 30]]}, marks=triton_marks,
                               labels={"cuts": lambda c: "two_chunks" if len(c) == 2 else "tokens_then_chunk"}))
def test_chunked_prefill_then_step_decode_equals_one_pass(backend, cuts):
    """Prefill in chunks, then 5 one-token steps, carrying the state: equals one full pass."""
    T = 45
    q, k, v, g, state = case(T, 3, "left")
    full_out, full_state = op.lightning_attention(q, k, v, g, state, backend="naive")
    pieces, start = [], 0
    for stop in [*cuts, *range(T - 5, T + 1)]:
        if stop <= start:
            continue
        o, state = op.lightning_attention(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop],
                                          g[:, :, start:stop], state, backend=backend)
        pieces.append(o)
        start = stop
    assert start == T
    assert torch.allclose(torch.cat(pieces, dim=2), full_out, atol=1e-4, rtol=1e-4)
    assert torch.allclose(state, full_state, atol=1e-4, rtol=1e-4)


def test_no_decay_is_causal_linear_attention():
    """With decay 1 the op is plain causal linear attention, written out as a masked matmul."""
    q, k, v, _, _ = case(33, 1, "left", batch=1, Hkv=1, with_state=False)
    out, _ = op.lightning_attention(q, k, v, torch.zeros(1, 1, 33), None, backend="cpu")
    scores = (q[0, 0] @ k[0, 0].T).tril()
    assert torch.allclose(out[0, 0], scores @ v[0, 0], atol=1e-4)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        op.lightning_attention(*case(4, 1, "left"), backend="fast")
