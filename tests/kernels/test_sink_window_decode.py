"""``sink_window_decode`` backends against the naive reference: one query over ring-ordered kept slots."""

from __future__ import annotations

import itertools

import pytest
import torch

from headwise.kernels import sink_window_decode as op
from headwise.kernels.sink_window import naive as prefill_naive
from tests.kernels.cases import TOLERANCE, WINDOWS, decode_case

LENGTHS = [1, 63, 64, 65, 1000, 4097]
GRID = [pytest.param(length, gqa, sink, window, dtype, id=f"len{length}-gqa{gqa}-sink{sink}-{window}-{name}")
        for length, gqa, sink, window in itertools.product(LENGTHS, [1, 3, 4], [0, 4, 64], WINDOWS)
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")) if name == "fp32" or gqa == 3]


@pytest.mark.parametrize("length,gqa,sink,window,dtype", GRID)
def test_cpu_decode(length, gqa, sink, window, dtype):
    args = decode_case(length, gqa, sink, window, dtype)
    expected = op.sink_window_decode(*args, backend="naive")
    got = op.sink_window_decode(*args, backend="cpu")
    assert got.shape == expected.shape == args[0].shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])
    assert (got[args[3] < 0] == 0).all(), "idle batch rows must give zeros"


def test_naive_decode_is_the_prefill_reference_with_one_query():
    q, k, v, q_pos, k_pos, sink, span, scale = decode_case(300, 3, 4, "win_lt", torch.float32)
    full = prefill_naive.sink_window_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale)
    torch.testing.assert_close(op.sink_window_decode(q, k, v, q_pos, k_pos, sink, span, scale, backend="naive"),
                               full[:, :, 0], rtol=0, atol=0)


def test_decode_ignores_keys_that_left_the_window():
    """Stale keys still in the ring (older than the window) must not change the output."""
    q, k, v, q_pos, k_pos, sink, span, scale = decode_case(500, 3, 4, "win_lt", torch.float32)
    stale = (k_pos >= sink[None, :, None]) & (k_pos <= q_pos[:, None, None] - span[:, :, None]) & (k_pos >= 0)
    assert stale.any()
    noisy_k = torch.where(stale[..., None], torch.randn_like(k) * 100, k)
    for backend in ("naive", "cpu"):
        torch.testing.assert_close(op.sink_window_decode(q, noisy_k, v, q_pos, k_pos, sink, span, scale, backend=backend),
                                   op.sink_window_decode(q, k, v, q_pos, k_pos, sink, span, scale, backend=backend))
