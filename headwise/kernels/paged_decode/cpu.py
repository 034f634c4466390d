"""CPU paged decode: gather the pages once, then one fp32 masked attention over the kept slots.

Decode reads every kept key once whatever the order, so gathering pages (one copy of the kept KV)
and the direct path of ``sink_window.cpu`` cost ``O(kept)``. Same signature as ``naive.paged_decode``.
"""

from __future__ import annotations

import torch

from ..sink_window.cpu import direct_attention
from .naive import gather_pages


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor,
                 block_tables: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """``[B, H, D]`` decode output; shapes as ``naive.paged_decode``."""
    k, v, k_pos = gather_pages(k_pool, v_pool, pos_pool, block_tables)
    return direct_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale)[:, :, 0]
