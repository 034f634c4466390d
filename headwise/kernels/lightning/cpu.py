"""Block (intra/inter) form of lightning attention for CPUs: ``O(T * C * F + T * F * E)`` work.

Tokens go in blocks of ``C``. With ``G_t`` the cumulative log decay inside a block (``G_t = g_1 +
... + g_t``) and ``S_0`` the state entering it::

    intra:  o_t += sum_{s<=t in block} exp(G_t - G_s) (q_t . k_s) v_s      (masked C x C matmul)
    inter:  o_t += exp(G_t) q_t S_0
    state:  S_C  = exp(G_C) S_0 + sum_s exp(G_C - G_s) k_s^T v_s

(TransNormerLLM's lightning attention; the decay differences are taken before ``exp`` so nothing
overflows.) Same signature and result as ``naive.lightning_attention``; fp32 math.
"""

from __future__ import annotations

import torch

from .fold import lightning_state

#: Tokens per block: the intra part costs ``C`` per token, the inter part one state read per block.
BLOCK = 64


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        initial_state: torch.Tensor | None = None, block: int = BLOCK
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes as ``naive.lightning_attention``; ``block`` tokens per block."""
    B, H, T, F = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    G = H // Hkv
    if T == 1:
        return _one_token(q, k, v, log_decay, initial_state)
    state = q.new_zeros(B, Hkv, F, E, dtype=torch.float32) if initial_state is None else initial_state.float()
    qf = q.float().reshape(B, Hkv, G, T, F)
    kf, vf, gf = k.float(), v.float(), log_decay.float()
    out = torch.empty(B, Hkv, G, T, E, dtype=torch.float32, device=q.device)
    causal = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    for start in range(0, T, block):
        stop = min(T, start + block)
        n = stop - start
        cum = gf[:, :, start:stop].cumsum(-1)                                     # [B, Hkv, n]
        qb, kb, vb = qf[:, :, :, start:stop], kf[:, :, start:stop], vf[:, :, start:stop]
        diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal[:n, :n], float("-inf"))
        scores = torch.matmul(qb, kb[:, :, None].transpose(-1, -2)) * diff.exp()[:, :, None]   # [B, Hkv, G, n, n]
        o = torch.matmul(scores, vb[:, :, None])                                  # [B, Hkv, G, n, E]
        o += torch.matmul(qb * cum.exp()[:, :, None, :, None], state[:, :, None])
        out[:, :, :, start:stop] = o
        state = lightning_state(kb, vb, gf[:, :, start:stop], state)              # S_C, the block's inter update
    return out.view(B, H, T, E), state


def _one_token(q, k, v, log_decay, initial_state):
    """Decode step: ``S = exp(g) S + k^T v``, ``o = q S`` (shapes as the full op with ``T = 1``)."""
    B, H, _, F = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    state = q.new_zeros(B, Hkv, F, E, dtype=torch.float32) if initial_state is None else initial_state.float()
    state = state * log_decay.float().exp()[..., None] + k.float().transpose(-1, -2) @ v.float()
    out = torch.matmul(q.float().reshape(B, Hkv, H // Hkv, F)[:, :, :, None], state[:, :, None])   # [B,Hkv,G,1,E]
    return out.reshape(B, H, 1, E), state
