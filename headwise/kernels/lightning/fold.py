"""The state a lightning pass ends with, without its outputs: one decayed matmul per head.

With ``G_t = g_1 + ... + g_t`` the cumulative log decay of the ``T`` tokens::

    S_T = exp(G_T) S_0 + sum_t exp(G_T - G_t) k_t^T v_t

— the ``state`` result of ``lightning_attention`` (every backend) for ``O(T * F * E)`` work and no
``q``. A dense prefill needs only this: its outputs come from softmax, its state from the keys.
Plain torch, so it runs on every device.
"""

from __future__ import annotations

import torch


def lightning_state(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                    initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """Final state of ``lightning_attention`` over these tokens.

    Args:
        k: ``[B, Hkv, T, F]`` key features (zero at padding); v: ``[B, Hkv, T, E]`` values.
        log_decay: ``[B, Hkv, T]`` per-token log decay, ``<= 0`` (0 at padding).
        initial_state: ``[B, Hkv, F, E]`` state before the first token, or ``None`` (zeros).

    Returns:
        ``[B, Hkv, F, E]`` fp32.
    """
    cum = log_decay.float().cumsum(-1)                                            # [B, Hkv, T]
    last = cum[..., -1:]                                                          # [B, Hkv, 1]
    state = torch.matmul((k.float() * (last - cum).exp()[..., None]).transpose(-1, -2), v.float())
    if initial_state is not None:
        state = state + initial_state.float() * last.exp()[..., None]
    return state
