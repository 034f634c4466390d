"""``softplus`` op: softplus (or exp) attention with a length scale and re-weighting (LSSA / LSSAR).

``softplus_attention(q, k, v, q_pos, k_pos, sink, span, scale, params, backend="auto")`` — the
math, shapes and per-head ``HeadParams`` in ``naive`` (the reference). Prefill and decode are one
call (decode is ``Q = 1``); keys and values are a normal KV cache in any slot order with explicit
positions, each KV head reading its sink + window like ``sink_window``. ``auto`` picks ``triton``
on CUDA when Triton is installed, ``cpu`` otherwise, and logs which one ran.
"""

from __future__ import annotations

import torch

from .. import AUTO_ORDER, pick_backend, standard_backends
from . import cpu, naive
from .naive import HeadParams

BACKENDS = standard_backends(__name__, "softplus_attention", naive, cpu)


def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                       params: HeadParams, backend: str = "auto") -> torch.Tensor:
    """``[B, H, Q, D]`` attention output in ``q.dtype``; see ``naive.softplus_attention``."""
    Hkv = k.shape[1]
    if any(t.shape != (Hkv,) for t in params) or sink.shape != (Hkv,):
        raise ValueError(f"softplus_attention: sink and every HeadParams tensor must have shape [{Hkv}] (one entry "
                         f"per KV head), got sink {tuple(sink.shape)} and {[tuple(t.shape) for t in params]}.")
    fn = pick_backend("softplus", BACKENDS, AUTO_ORDER, backend, q.device)
    return fn(q, k, v, q_pos, k_pos, sink, span, scale, params.to(q.device))


__all__ = ["softplus_attention", "HeadParams", "BACKENDS", "AUTO_ORDER"]
