"""Triton decode step: the paged decode kernel on a dense cache seen as one block per (sequence, head).

A ``[B, Hkv, C, D]`` cache is a pool of ``B * Hkv`` blocks of ``C`` slots (``Hb = 1``) with the
trivial block table ``b * Hkv + h``; no data is copied when the cache is contiguous. Same signature
as ``naive.sink_window_decode``; kernel notes in ``paged_decode.triton``.
"""

from __future__ import annotations

import torch

from ..paged_decode.triton import paged_decode


def sink_window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, H, D]`` decode output; shapes as ``naive.sink_window_decode``."""
    B, Hkv, C, D = k.shape
    k_pool = k.contiguous().view(B * Hkv, C, 1, D)
    v_pool = v.contiguous().view(B * Hkv, C, 1, D)
    pos_pool = k_pos.expand(B, Hkv, C).reshape(B * Hkv, C)
    tables = torch.arange(B * Hkv, device=k.device, dtype=torch.int32).view(B, Hkv, 1)
    return paged_decode(q, k_pool, v_pool, pos_pool, tables, q_pos, sink, span, scale)
