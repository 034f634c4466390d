"""Triton backends of every op against the naive references, on CPU under ``TRITON_INTERPRET=1``.

Triton decides at import whether it interprets; ``tests/conftest.py`` sets ``TRITON_INTERPRET=1``
before anything imports Triton, so these tests run in this process. If Triton was nevertheless
imported without the interpreter (and there is no GPU), ``test_triton_kernels_in_interpreter_subprocess``
runs this file again in a fresh ``python -m pytest`` with the variable set and every other test here
is skipped in the parent process.
The interpreter is slow: shapes are small.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from headwise.kernels import paged_decode as paged_op  # noqa: E402
from headwise.kernels import sink_window as prefill_op  # noqa: E402
from tests.kernels.cases import TOLERANCE, decode_case, paged, prefill_case  # noqa: E402
from tests.kernels.test_sink_window import check, scrambled  # noqa: E402

INTERPRETED = type(tl.zeros).__name__ == "InterpretedFunction"
ON_GPU = torch.cuda.is_available()
runs_here = pytest.mark.skipif(not (INTERPRETED or ON_GPU),
                               reason="Triton was imported without TRITON_INTERPRET=1; run by the subprocess test")


@pytest.mark.skipif(INTERPRETED or ON_GPU, reason="the Triton tests run in this process")
def test_triton_kernels_in_interpreter_subprocess():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=root, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-4000:]
    summary = result.stdout.strip().splitlines()[-1]
    # Everything ran there except this very test, which skips itself in the interpreted process.
    assert re.fullmatch(r"\d+ passed, 1 skipped in .*", summary), result.stdout[-2000:]


def on_device(args):
    device = "cuda" if ON_GPU and not INTERPRETED else "cpu"
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


PREFILL = [  # length, gqa, sink, window, padding
    (1, 1, 0, "win_lt", "left"), (63, 3, 4, "win_lt", "right"), (65, 4, 0, "win_eq", "left"),
    (65, 3, 64, "win_gt", "right"), (130, 1, 4, "win_lt", "left"), (130, 3, 0, "win_gt", "left"),
]


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length,gqa,sink,window,padding",
                         [pytest.param(*p, id="len{}-gqa{}-sink{}-{}-{}".format(*p)) for p in PREFILL])
def test_triton_prefill(length, gqa, sink, window, padding, dtype):
    case = prefill_case(length, gqa, sink, window, padding, dtype, batch=2, Hkv=2)
    check("triton", case, dtype)


@runs_here
@pytest.mark.parametrize("queries", [1, 70], ids=lambda q: f"{q}q")
def test_triton_prefill_any_slot_order(queries):
    check("triton", scrambled(prefill_case(150, 3, 4, "win_lt", "right", torch.float32, batch=2, queries=queries)),
          torch.float32)


DECODE = [(1, 1, 0, "win_lt"), (65, 3, 4, "win_lt"), (200, 4, 64, "win_eq"), (200, 3, 0, "win_gt")]


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length,gqa,sink,window", [pytest.param(*p, id="len{}-gqa{}-sink{}-{}".format(*p)) for p in DECODE])
def test_triton_decode(length, gqa, sink, window, dtype):
    """A dense ring cache seen as a pool of one block per (sequence, KV head), in fp32 and bf16."""
    q, k, v, q_pos, k_pos, sink_t, span, scale = decode_case(length, gqa, sink, window, dtype)
    B, Hkv, C, D = k.shape
    args = (q, k.reshape(B * Hkv, C, 1, D), v.reshape(B * Hkv, C, 1, D), k_pos.expand(B, Hkv, C).reshape(B * Hkv, C),
            torch.arange(B * Hkv, dtype=torch.int32).view(B, Hkv, 1), q_pos, sink_t, span, scale)
    expected = paged_op.paged_decode(*args, backend="naive")
    got = paged_op.paged_decode(*on_device(args), backend="triton").cpu()
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


@runs_here
@pytest.mark.parametrize("block_size,heads_per_block", [(16, 1), (5, 1), (16, 2)], ids=["per-head-bs16", "per-head-bs5", "shared-bs16"])
@pytest.mark.parametrize("length,gqa,sink,window", [pytest.param(*p, id="len{}-gqa{}-sink{}-{}".format(*p)) for p in DECODE])
def test_triton_paged_decode(length, gqa, sink, window, block_size, heads_per_block):
    q, k, v, q_pos, k_pos, sink_t, span, scale = decode_case(length, gqa, sink, window, torch.float32)
    if heads_per_block > 1:
        k_pos = k_pos[:, :1].expand_as(k_pos).contiguous()
    args = (q, *paged(k, v, k_pos, block_size, heads_per_block), q_pos, sink_t, span, scale)
    expected = paged_op.paged_decode(*args, backend="naive")
    got = paged_op.paged_decode(*on_device(args), backend="triton").cpu()
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


@runs_here
def test_triton_prefill_skips_tiles_outside_sink_and_window():
    """Keys outside every query's sink + window are never read: poisoning them changes nothing."""
    case = prefill_case(256, 3, 4, "win_lt", "left", torch.float32, batch=1, Hkv=1)
    case.span = torch.full_like(case.span, 32)
    clean = prefill_op.sink_window_attention(*on_device(case.args()), backend="triton").cpu()
    far = (case.k_pos[0, 0] >= 8) & (case.k_pos[0, 0] < 64)          # no query in the last block reads these
    case.k[:, :, far] = float("nan")
    case.q_pos = case.q_pos.clone()
    case.q = case.q[:, :, -64:]
    case.q_pos = case.q_pos[:, -64:]
    poisoned = prefill_op.sink_window_attention(*on_device(case.args()), backend="triton").cpu()
    torch.testing.assert_close(poisoned, clean[:, :, -64:])
