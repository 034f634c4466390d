"""``hybrid_window`` op: softmax over each KV head's sink + window, normalised together with a linear part.

``hybrid_window_attention(q, k, v, q_pos, k_pos, sink, span, scale, lin_num, lin_den, backend="auto")``
— shapes in ``naive.hybrid_window_attention``. The exact part is ``sink_window``'s (same visibility
rule); its weights ``exp(a - m)`` (``m``: the row's largest visible score) share one denominator
with the caller's linear-attention part, as LoLCATs' sliding-window + linear heads do::

    out = (sum_visible exp(a_s - m) v_s + lin_num) / (sum_visible exp(a_s - m) + lin_den)

``auto`` picks ``triton`` on CUDA when Triton is installed, else ``cpu``, and logs which one ran.
"""

from __future__ import annotations

import torch

from .. import AUTO_ORDER, pick_backend, standard_backends
from . import cpu, naive

BACKENDS = standard_backends(__name__, "hybrid_window_attention", naive, cpu)


def hybrid_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                            lin_num: torch.Tensor, lin_den: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sink + window softmax sharing its normaliser with a linear part, ``[B, H, Q, D]`` out in
    ``q.dtype``; see ``naive.hybrid_window_attention``."""
    fn = pick_backend("hybrid_window", BACKENDS, AUTO_ORDER, backend, q.device)
    return fn(q, k, v, q_pos, k_pos, sink, span, scale, lin_num, lin_den)


__all__ = ["hybrid_window_attention", "BACKENDS", "AUTO_ORDER"]
