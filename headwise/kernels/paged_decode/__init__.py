"""``paged_decode`` op: one query per sequence, sink + window attention over a paged KV pool.

``paged_decode(q, k_pool, v_pool, pos_pool, block_tables, q_pos, sink, span, scale, backend="auto")``
— pool layout and shapes in ``naive`` (its module docstring and ``naive.paged_decode``). Backends:
``naive`` (reference), ``cpu`` (torch: gather pages, masked attention), ``native`` (C kernel built
on first use, reads each kept key once; ``auto`` picks it on CPU when it builds), ``triton``. There is
no separate plan step: the block tables are read directly by every backend, so a decode engine
builds ``block_tables`` / ``q_pos`` / ``span`` once per batch and calls this once per layer.
"""

from __future__ import annotations

import torch

from .. import AUTO_ORDER as SHARED_AUTO_ORDER
from .. import pick_backend, standard_backends
from . import cpu, naive, native

BACKENDS = {**standard_backends(__name__, "paged_decode", naive, cpu), "native": native.paged_decode}
# The native C kernel (built on first use) before the torch path on CPU; triton first on CUDA.
AUTO_ORDER = [SHARED_AUTO_ORDER[0], ("native", lambda device: device.type == "cpu" and native.available()),
              *SHARED_AUTO_ORDER[1:]]


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor,
                 block_tables: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
                 scale: float, backend: str = "auto") -> torch.Tensor:
    """``[B, H, D]`` decode output over a paged pool; see ``naive.paged_decode``."""
    Hb, Ht = k_pool.shape[2], block_tables.shape[1]
    if sink.shape[0] != Ht * Hb:
        raise ValueError(f"paged_decode: {Ht} block-table rows x {Hb} heads per block give {Ht * Hb} KV heads but "
                         f"sink has {sink.shape[0]}; make block_tables [B, Hkv // Hb, M] for a [P, bs, Hb, D] pool.")
    fn = pick_backend("paged_decode", BACKENDS, AUTO_ORDER, backend, q.device)
    return fn(q, k_pool, v_pool, pos_pool, block_tables, q_pos, sink, span, scale)


#: ``paged_decode_logical`` backends: the reference and the native kernel (no torch or Triton path yet).
LOGICAL_BACKENDS = {"naive": naive.paged_decode_logical, "native": native.paged_decode_logical}
LOGICAL_AUTO_ORDER = [("native", lambda device: device.type == "cpu" and native.available()),
                      ("naive", lambda device: True)]


def paged_decode_logical(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                         q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                         null_block: int = -1, backend: str = "auto") -> torch.Tensor:
    """``[B, H, D]`` decode output over block tables in position order (vLLM's), positions implied.

    Args:
        q: ``[B, H, D]``; k_pool, v_pool: ``[P, block_size, Hkv, D]`` fp32 or bf16 (strided views allowed);
        block_table: ``[B, M]`` int32 each sequence's blocks in position order, ``< 0`` or ``null_block``:
        nothing; q_pos ``[B]`` int64; sink ``[Hkv]`` int64; span ``[B, Hkv]`` int64; scale: softmax scale.

    Each KV head reads only its sink entries and the entries of its window (``naive.paged_decode_logical``),
    so no per-head table and no position pool is built per step.
    """
    fn = pick_backend("paged_decode_logical", LOGICAL_BACKENDS, LOGICAL_AUTO_ORDER, backend, q.device)
    return fn(q, k_pool, v_pool, block_table, q_pos, sink, span, scale, null_block)


__all__ = ["paged_decode", "paged_decode_logical", "BACKENDS", "AUTO_ORDER"]
