"""Routed attention on GPU: the active pairs, packed (``pack.py``), through ``sink_window``'s Triton kernel.

``import triton`` happens when this module is imported (through ``sink_window.triton``); the op's
``__init__`` loads it lazily on first use. On CPU tensors it runs only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

from ..sink_window import triton as sink_window_triton
from .pack import packed_routed_attention


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sink: torch.Tensor, span: torch.Tensor, scale: float, active: torch.Tensor) -> torch.Tensor:
    """Same signature and result as ``naive.routed_attention``."""
    return packed_routed_attention(sink_window_triton.sink_window_attention, q, k, v, q_pos, k_pos, sink, span,
                                   scale, active)
