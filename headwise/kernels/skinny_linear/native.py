"""Native skinny linear (``skinny_linear.c``): streams each weight once for a few rows, as decode needs.

Why: a decode step multiplies ``M`` = (number of sequences) rows by every weight matrix, which is
memory-bound; MKL's fp32 GEMM for ``x @ W^T`` with ``M = 4`` reached 8.5 GB/s here against 15.4 GB/s
for this kernel on one thread (measured, weights of SmolLM2's shapes). Same signature as ``naive``.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from ..native_build import load_native, native_error

SOURCE = Path(__file__).with_name("skinny_linear.c")
#: Rows up to which the native kernel beats MKL here (measured at 4 and 8 rows; slower at 16).
MAX_ROWS = 8


@lru_cache(maxsize=1)
def _library():
    lib = load_native(SOURCE)
    if lib is not None:
        lib.skinny_linear.restype = ctypes.c_int
        lib.skinny_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """CPU fp32/bf16 rows (at most ``MAX_ROWS``), contiguous fp32/bf16 weight, no autograd (it has none)."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() >= 1 and weight.dim() == 2
            and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()
            and 1 <= x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and (bias is None or bias.dim() == 1) and available())


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., I] -> [..., O]``; shapes and dtypes as ``naive.skinny_linear`` (fp32 math, output in ``x.dtype``)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native skinny_linear kernel could not be built here; use backend='naive'.")
    O, I = weight.shape
    rows = x.reshape(-1, I).float().contiguous()
    M = rows.shape[0]
    if not 1 <= M <= 16:
        raise ValueError(f"native skinny_linear takes 1 to 16 rows, got {M}; use torch.nn.functional.linear.")
    y = torch.empty(M, O, dtype=torch.float32)
    bias = None if bias is None else bias.float().contiguous()
    rc = lib.skinny_linear(rows.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                           y.data_ptr(), M, I, O, int(weight.dtype == torch.bfloat16))
    if rc != 0:
        raise native_error(rc, f"native skinny_linear refused {M} rows.")
    return y.reshape(*x.shape[:-1], O).to(x.dtype)
