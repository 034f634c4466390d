"""``sink_window_decode`` op: one query per sequence over each KV head's kept (ring-ordered) cache.

``sink_window_decode(q, k, v, q_pos, k_pos, sink, span, scale, backend="auto")`` — shapes in
``naive.sink_window_decode``. ``auto`` picks ``triton`` on CUDA when Triton is installed, else
``cpu``, and logs which one ran. The paged form is ``kernels.paged_decode``.
"""

from __future__ import annotations

import torch

from .. import AUTO_ORDER, pick_backend, standard_backends
from . import cpu, naive

BACKENDS = standard_backends(__name__, "sink_window_decode", naive, cpu)


def sink_window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                       backend: str = "auto") -> torch.Tensor:
    """``[B, H, D]`` decode output; see ``naive.sink_window_decode``."""
    fn = pick_backend("sink_window_decode", BACKENDS, AUTO_ORDER, backend, q.device)
    return fn(q, k, v, q_pos, k_pos, sink, span, scale)


__all__ = ["sink_window_decode", "BACKENDS", "AUTO_ORDER"]
