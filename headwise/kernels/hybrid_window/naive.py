"""Reference hybrid window attention: readable torch, fp32 math, explicit positions.

The contract of every ``hybrid_window`` backend (docs/design.md, "Kernels"). Per query ``t`` with visible keys
``V_t`` (``sink_window``'s rule: ``k < sink`` or ``k > t - span``, causal) and scores
``a_s = scale * q_t . k_s``::

    m_t   = max_{s in V_t} a_s
    out_t = (sum_{s in V_t} exp(a_s - m_t) v_s + lin_num_t) / (sum_{s in V_t} exp(a_s - m_t) + lin_den_t)

``lin_num`` / ``lin_den`` are the caller's linear-attention numerator and normaliser, already
weighted (a ``hybrid`` head passes its mixing factor times its decayed feature-map sums over the
keys older than the window). Subtracting ``m_t`` is part of the definition, not only a numerical
guard: the linear part is weighed against ``exp(a - m)``, whose largest term is 1 (LoLCATs).
"""

from __future__ import annotations

import torch

from ..sink_window.naive import visible


def combine(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor, lin_num: torch.Tensor,
            lin_den: torch.Tensor) -> torch.Tensor:
    """The shared-denominator combination for one set of rows.

    Args:
        scores: ``[..., R, S]`` fp32 scaled scores; allowed: ``[..., R, S]`` bool (broadcastable);
        v: ``[..., S, D]`` fp32; lin_num: ``[..., R, D]`` fp32; lin_den: ``[..., R]`` fp32.

    Returns:
        ``[..., R, D]`` fp32; rows with a zero denominator (nothing visible, no linear mass) are 0.
    """
    if scores.shape[-1] == 0:                                     # no key slot at all: the linear part alone
        return torch.where(lin_den[..., None] > 0, lin_num / lin_den.clamp(min=torch.finfo(torch.float32).tiny)[..., None],
                           0.0)
    scores = scores.masked_fill(~allowed, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)                                     # 0 where masked
    num = p @ v + lin_num
    den = p.sum(-1) + lin_den
    return torch.where(den[..., None] > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny)[..., None], 0.0)


def hybrid_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                            lin_num: torch.Tensor, lin_den: torch.Tensor, query_chunk: int = 256) -> torch.Tensor:
    """Sink + window softmax attention whose normaliser also holds a linear-attention part.

    Args:
        q: ``[B, H, Q, D]`` queries (query head ``i`` reads KV head ``i // (H // Hkv)``).
        k, v: ``[B, Hkv, S, D]`` keys and values, in any slot order.
        q_pos: ``[B, Q]`` int64 query positions, -1 for padding; k_pos: ``[B, Hk, S]`` int64 key
            positions (``Hk`` 1 or ``Hkv``), -1 for empty slots.
        sink: ``[Hkv]`` int64; span: ``[B, Hkv]`` int64 exact window (the query itself included);
            see ``headwise.kernels.sink_window.naive.visible``.
        scale: softmax scale.
        lin_num: ``[B, H, Q, D]`` and lin_den: ``[B, H, Q]`` the linear part (fp32, ``lin_den >= 0``).
        query_chunk: queries per step (memory bound ``B * H * query_chunk * S``).

    Returns:
        ``[B, H, Q, D]`` in ``q.dtype``; padding queries get zeros.
    """
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    kf, vf = k.float(), v.float()
    out = q.new_zeros(B, H, Q, D)
    for start in range(0, Q, query_chunk):
        stop = min(Q, start + query_chunk)
        n = stop - start
        qc = q[:, :, start:stop].float().view(B, Hkv, G, n, D)
        allowed = visible(q_pos[:, start:stop], k_pos, sink, span)[:, :, None]          # [B, Hkv, 1, n, S]
        scores = torch.einsum("bhgqd,bhsd->bhgqs", qc, kf) * scale
        num = lin_num[:, :, start:stop].float().reshape(B, Hkv, G, n, D)
        den = lin_den[:, :, start:stop].float().reshape(B, Hkv, G, n)
        oc = combine(scores, allowed, vf[:, :, None], num, den)
        oc = oc.masked_fill((q_pos[:, start:stop] < 0)[:, None, None, :, None], 0.0)
        out[:, :, start:stop] = oc.reshape(B, H, n, D).to(q.dtype)
    return out
