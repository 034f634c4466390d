"""``routed_attention`` op: sink + window attention computed only for the active (query head, token) pairs.

``routed_attention(q, k, v, q_pos, k_pos, sink, span, scale, active, backend="auto")`` — shapes in
``naive.routed_attention``. It is the attention of Mixture-of-Head routing (``headwise.kinds.moh``):
a router picks, per token, which query heads run; the others do no attention work.

Backends share the signature: ``naive`` (the reference: every pair computed, inactive ones zeroed),
``cpu`` and ``triton`` (``pack.py``: the active pairs are gathered into rows and run by the
``sink_window`` op's ``cpu`` / ``triton`` kernel, so cost follows the active pairs; a KV head none
of whose query heads is active for a sequence is not read at all). ``auto`` picks ``triton`` on
CUDA when Triton is installed, ``cpu`` otherwise, and logs which one ran.
"""

from __future__ import annotations

import torch

from .. import AUTO_ORDER, pick_backend, standard_backends
from . import cpu, naive

BACKENDS = standard_backends(__name__, "routed_attention", naive, cpu)


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sink: torch.Tensor, span: torch.Tensor, scale: float, active: torch.Tensor,
                     backend: str = "auto") -> torch.Tensor:
    """Routed sink + window attention, ``[B, H, Q, D]`` out; see ``naive.routed_attention``."""
    if active.shape != (q.shape[0], q.shape[1], q.shape[2]) or active.dtype != torch.bool:
        raise ValueError(f"routed_attention: active must be a bool tensor [B, H, Q] = {tuple(q.shape[:3])}, got "
                         f"{active.dtype} {tuple(active.shape)}.")
    fn = pick_backend("routed_attention", BACKENDS, AUTO_ORDER, backend, q.device)
    return fn(q, k, v, q_pos, k_pos, sink, span, scale, active)


__all__ = ["routed_attention", "BACKENDS", "AUTO_ORDER"]
