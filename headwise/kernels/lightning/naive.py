"""Reference lightning (decayed linear) attention: the token-by-token recurrence, fp32.

This is the contract of every backend of the ``lightning`` op (docs/design.md, "Kernels"). With per-token log
decay ``g_t <= 0`` (the head's ``log(lambda)`` at real tokens, ``0`` at padding)::

    S_t = exp(g_t) * S_{t-1} + k_t^T v_t          o_t = q_t S_t

i.e. ``o_t = sum_{s<=t} exp(g_{s+1} + ... + g_t) (q_t . k_s) v_s`` — TransNormerLLM's lightning
attention with a scalar decay per head (fla's "simple GLA"). Feature maps and the normaliser are
applied by the caller (``headwise.kinds.lightning``): ``q, k`` here are already features.
"""

from __future__ import annotations

import torch


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal decayed linear attention by its recurrence.

    Args:
        q: ``[B, H, T, F]`` query features (``H`` a multiple of ``Hkv``; query head ``i`` reads the
            state of KV head ``i // (H // Hkv)``).
        k: ``[B, Hkv, T, F]`` key features (zero at padding tokens).
        v: ``[B, Hkv, T, E]`` values.
        log_decay: ``[B, Hkv, T]`` log of the decay applied to the state before token ``t`` is
            added, ``<= 0`` (0 at padding, so the state passes padding unchanged).
        initial_state: ``[B, Hkv, F, E]`` state before the first token, or ``None`` (zeros).

    Returns:
        ``(out [B, H, T, E], final_state [B, Hkv, F, E])``, both fp32.
    """
    B, H, T, F = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    G = H // Hkv
    state = q.new_zeros(B, Hkv, F, E, dtype=torch.float32) if initial_state is None else initial_state.float().clone()
    qf = q.float().view(B, Hkv, G, T, F)
    kf, vf, gf = k.float(), v.float(), log_decay.float()
    out = torch.empty(B, Hkv, G, T, E, dtype=torch.float32, device=q.device)
    for t in range(T):
        state = state * gf[:, :, t, None, None].exp() + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        out[:, :, :, t] = torch.einsum("bhgf,bhfe->bhge", qf[:, :, :, t], state)
    return out.view(B, H, T, E), state
