"""Routed attention on CPU: the active pairs, packed (``pack.py``), through ``sink_window``'s cpu kernel."""

from __future__ import annotations

import torch

from ..sink_window import cpu as sink_window_cpu
from .pack import packed_routed_attention


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sink: torch.Tensor, span: torch.Tensor, scale: float, active: torch.Tensor) -> torch.Tensor:
    """Same signature and result as ``naive.routed_attention``."""
    return packed_routed_attention(sink_window_cpu.sink_window_attention, q, k, v, q_pos, k_pos, sink, span, scale,
                                   active)
