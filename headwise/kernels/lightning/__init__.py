"""``lightning`` op: causal linear attention with a per-head decay, by blocks (prefill) or per token (decode).

``lightning_attention(q, k, v, log_decay, initial_state=None, backend="auto") -> (out, state)`` —
shapes in ``naive.lightning_attention``. A decode step is the same call with ``T = 1`` (the state
update per token). ``auto`` picks ``triton`` on CUDA when Triton is installed, else ``cpu``.
``lightning_state(k, v, log_decay, initial_state=None) -> state`` gives the final state alone
(``fold.py``: no outputs, one matmul per head), what a dense prefill needs.
"""

from __future__ import annotations

import torch

from .. import AUTO_ORDER, pick_backend, standard_backends
from . import cpu, naive
from .fold import lightning_state

BACKENDS = standard_backends(__name__, "lightning_attention", naive, cpu)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        initial_state: torch.Tensor | None = None, backend: str = "auto"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, T, E], state [B, Hkv, F, E])`` fp32; see ``naive.lightning_attention``."""
    fn = pick_backend("lightning", BACKENDS, AUTO_ORDER, backend, q.device)
    return fn(q, k, v, log_decay, initial_state)


__all__ = ["lightning_attention", "lightning_state", "BACKENDS", "AUTO_ORDER"]
