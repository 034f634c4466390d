"""``sink_window`` op: causal attention where each KV head reads its sink + its own local window.

``sink_window_attention(q, k, v, q_pos, k_pos, sink, span, scale, backend="auto")`` — shapes in
``naive.sink_window_attention``. Backends share that signature; ``auto`` picks the fastest one
that can run on the inputs' device (``triton`` on CUDA when Triton is installed, ``cpu``
otherwise) and logs which one ran. ``kernels.paged_decode`` is the one-query-per-sequence (decode) form
over a paged KV pool.
"""

from __future__ import annotations

import torch

from .. import AUTO_ORDER, pick_backend, standard_backends
from . import cpu, naive

BACKENDS = standard_backends(__name__, "sink_window_attention", naive, cpu)


def sink_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                          k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                          backend: str = "auto") -> torch.Tensor:
    """Sink + window attention, ``[B, H, Q, D]`` out; see ``naive.sink_window_attention``."""
    fn = pick_backend("sink_window", BACKENDS, AUTO_ORDER, backend, q.device)
    return fn(q, k, v, q_pos, k_pos, sink, span, scale)


__all__ = ["sink_window_attention", "BACKENDS", "AUTO_ORDER"]
