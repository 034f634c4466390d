"""CPU decode step: one fp32 masked attention over the kept slots (``sink_window.cpu``'s direct path).

Cost is ``O(B * H * C * D)`` with ``C`` the kept slots, which is all a decode step must read.
Same signature as ``naive.sink_window_decode``.
"""

from __future__ import annotations

import torch

from ..sink_window.cpu import direct_attention


def sink_window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, H, D]`` decode output; shapes as ``naive.sink_window_decode``."""
    return direct_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale)[:, :, 0]
