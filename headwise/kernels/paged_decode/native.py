"""Native CPU paged decode: ``paged_decode.c`` compiled on first use, called through ctypes.

Why: the torch path (``cpu.py``) gathers every sequence's pages into a dense copy padded to the
longest head of the layer, so a decode step reads the kept KV about three times and the padding
besides. The C kernel walks each (sequence, KV head)'s own table and reads every kept key and
value once, in parallel over (sequence, KV head) with OpenMP (the libgomp torch already loaded).

Built on first use by ``kernels.native_build``; ``available()`` says whether that worked (the
reason is logged once). Same signature as ``naive.paged_decode``.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from ..native_build import load_native

SOURCE = Path(__file__).with_name("paged_decode.c")
#: The largest block (slots) the kernel reads (``MAX_BS`` in the C source).
MAX_BLOCK = 512


@lru_cache(maxsize=1)
def _library():
    """The compiled kernel with its ctypes signature, or ``None`` when it cannot be built here."""
    lib = load_native(SOURCE)
    if lib is not None:
        lib.paged_decode.restype = ctypes.c_int
        lib.paged_decode.argtypes = ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 10
                                     + [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_int64])
    return lib


def available() -> bool:
    """Whether the native kernel is built (builds it on the first call)."""
    return _library() is not None


def supports(q: torch.Tensor, k_pool: torch.Tensor) -> bool:
    """Inputs the native kernel takes: CPU tensors, fp32/bf16 pools, G <= 16, D <= 256, block <= 512."""
    return (q.device.type == "cpu" and k_pool.device.type == "cpu" and k_pool.dtype in (torch.float32, torch.bfloat16)
            and k_pool.shape[1] <= MAX_BLOCK and k_pool.shape[-1] <= 256 and available())


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor,
                 block_tables: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """``[B, H, D]`` decode output; shapes as ``naive.paged_decode``."""
    return _run(q, k_pool, v_pool, pos_pool, block_tables, q_pos, sink, span, scale, None)


def paged_decode_logical(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                         q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                         null_block: int = -1) -> torch.Tensor:
    """``[B, H, D]`` decode output over a table in position order; shapes as ``naive.paged_decode_logical``."""
    return _run(q, k_pool, v_pool, None, block_table[:, None], q_pos, sink, span, scale, null_block)


def _run(q, k_pool, v_pool, pos_pool, block_tables, q_pos, sink, span, scale, null_block) -> torch.Tensor:
    """Call the kernel; ``null_block is None``: explicit positions (``pos_pool``), else a logical table."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the native paged_decode kernel could not be built here; use backend='cpu'.")
    B, H, D = q.shape
    P, bs, Hb, _ = k_pool.shape
    Ht, M = block_tables.shape[1], block_tables.shape[2]
    Hkv = Ht * Hb
    if H // Hkv > 16 or D > 256 or bs > MAX_BLOCK:
        raise ValueError(f"native paged_decode takes at most 16 query heads per KV head, head_dim 256 and blocks of "
                         f"{MAX_BLOCK} slots, got {H // Hkv}, {D}, {bs}; use backend='cpu'.")
    if k_pool.dtype not in (torch.float32, torch.bfloat16) or v_pool.dtype != k_pool.dtype:
        raise ValueError(f"native paged_decode reads float32 or bfloat16 pools, got {k_pool.dtype}; use backend='cpu'.")
    qf = q.float().contiguous()
    if k_pool.stride() != v_pool.stride() or k_pool.stride(-1) != 1:
        # read strided views in place (a vLLM cache is one); copy only layouts the kernel cannot stride
        k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    logical = null_block is not None
    pos_ptr = None if logical else pos_pool.to(torch.int64).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    q_pos = q_pos.to(torch.int64).contiguous()
    sink = sink.to(torch.int64).contiguous()
    span = span.to(torch.int64).expand(B, Hkv).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    rc = lib.paged_decode(qf.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(),
                          None if logical else pos_ptr.data_ptr(), tables.data_ptr(),
                          q_pos.data_ptr(), sink.data_ptr(), span.data_ptr(), out.data_ptr(),
                          B, H, Hkv, Hb, M, bs, D, k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
                          float(scale), int(k_pool.dtype == torch.bfloat16), int(logical),
                          -1 if null_block is None else int(null_block))
    if rc != 0:
        raise RuntimeError(f"native paged_decode refused shapes B={B} H={H} Hkv={Hkv} D={D} block={bs}.")
    return out.to(q.dtype)
