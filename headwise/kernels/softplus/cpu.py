"""Fast torch softplus attention for CPUs: query blocks over only the key slots they can read.

Same signature and result as ``naive.softplus_attention``. The re-weighting needs each row's l1
normaliser (and its largest weight) before any weight is final, so every row is computed whole:
queries go in blocks sized so one block's ``[B, H, block, S]`` fp32 scores stay near
``BLOCK_BYTES``, and a 16k-token prefill never holds an ``N x N`` matrix for all heads. A block
reads only the slots up to the last one whose position it can reach (the causal prefix when slots
are in position order: prefill, a compacted cache plus new keys), so a prefill does about half of
the ``Q x S`` products; windows shrink the KV held, not this work. Heads that are plain softmax
with a row scale (exp, no re-weighting) use torch's fused ``scaled_dot_product_attention`` on
queries multiplied by ``m(n)``; the others run the fp32 steps of the reference in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sink_window.naive import visible
from .naive import SOFTPLUS_LINEAR_BELOW, HeadParams, row_scale

#: Target bytes of one block's fp32 scores (all heads); the query block is sized from it.
BLOCK_BYTES = 32 * 2**20
MIN_BLOCK, MAX_BLOCK = 16, 512


def _block_size(B: int, H: int, S: int) -> int:
    rows = BLOCK_BYTES // max(1, B * H * S * 4)
    return int(max(MIN_BLOCK, min(MAX_BLOCK, rows)))


def _reachable_slots(k_pos: torch.Tensor, q_max: int) -> int:
    """Slots ``[0, limit)`` hold every key with position ``0 <= pos <= q_max`` (``k_pos [B, Hk, S]``)."""
    ok = (k_pos >= 0) & (k_pos <= q_max)
    if not bool(ok.any()):
        return 0
    index = torch.arange(1, k_pos.shape[-1] + 1, device=k_pos.device)
    return int((ok * index).amax())


def _custom_rows(qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, n: torch.Tensor,
                 m: torch.Tensor, scale: float, params: HeadParams) -> torch.Tensor:
    """The reference math for one block of heads, in place: ``qf [B, Hs, G, Qb, D]`` fp32,
    ``k, v [B, Hs, S, D]``, ``allowed [B, Hs, Qb, S]``, ``n, m [B, Hs, Qb]`` -> ``[B, Hs, G, Qb, D]`` fp32."""
    B, Hs, G, Qb, D = qf.shape
    S = k.shape[2]
    x = torch.matmul(qf.view(B, Hs, G * Qb, D), k.float().transpose(-1, -2)).view(B, Hs, G, Qb, S)
    x.mul_((m * scale)[:, :, None, :, None])
    soft = params.softplus.view(1, Hs, 1, 1, 1)
    if bool(params.softplus.any()):
        lg = torch.log(F.softplus(x))
        lg = torch.where(soft & (x >= SOFTPLUS_LINEAR_BELOW), lg, x)
    else:
        lg = x
    lg.masked_fill_(~allowed[:, :, None], float("-inf"))
    probs = torch.softmax(lg, dim=-1)
    del lg, x
    probs.nan_to_num_(0.0)                                                      # rows with nothing readable
    power = params.power.view(1, Hs, 1, 1, 1).float()
    if bool((params.power > 0).any()):
        weights = probs * n[:, :, None, :, None].float()
        weights.sub_(1.0).clamp_(min=0.0)                                       # ReLU(n A - 1)
        top = weights.amax(-1, keepdim=True)
        weights.div_(torch.where(top > 0, top, 1.0))
        weights.pow_(torch.where(power > 0, power, 1.0))
        total = weights.sum(-1, keepdim=True)
        weights.div_(torch.where(total > 0, total, 1.0))
        probs = torch.where((power == 0) | (top <= 0), probs, weights)
    return torch.matmul(probs.view(B, Hs, G * Qb, S), v.float()).view(B, Hs, G, Qb, D)


def _softmax_rows(qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, m: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """Exp heads without re-weighting: softmax of ``m * s`` via fused sdpa on ``m``-scaled queries.
    Shapes as ``_custom_rows``; rows with nothing readable -> 0."""
    B, Hs, G, Qb, D = qf.shape
    S = k.shape[2]
    qs = (qf * m[:, :, None, :, None]).view(B, Hs, G * Qb, D)
    mask = allowed[:, :, None].expand(B, Hs, G, Qb, S).reshape(B, Hs, G * Qb, S)
    out = F.scaled_dot_product_attention(qs, k.float(), v.float(), attn_mask=mask, scale=scale)
    return out.view(B, Hs, G, Qb, D).nan_to_num(0.0)


def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       sink: torch.Tensor, span: torch.Tensor, scale: float, params: HeadParams,
                       query_block: int | None = None) -> torch.Tensor:
    """``[B, H, Q, D]`` in ``q.dtype``; arguments as ``naive.softplus_attention`` (``query_block``:
    queries per block, default sized from ``BLOCK_BYTES``)."""
    B, H, Q, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    out = q.new_zeros(B, H, Q, D)
    simple = (~params.softplus) & (params.power == 0)
    groups = [(list(range(Hkv)), bool(simple.all()))] if bool(simple.all() | (~simple).all()) else \
        [([h for h in range(Hkv) if bool(simple[h])], True), ([h for h in range(Hkv) if not bool(simple[h])], False)]
    block = query_block or _block_size(B, H, S)
    for start in range(0, Q, block):
        stop = min(Q, start + block)
        qp = q_pos[:, start:stop]
        limit = _reachable_slots(k_pos, int(qp.max()))
        if limit == 0:
            continue
        kp = k_pos[..., :limit]
        allowed = visible(qp, kp, sink, span).expand(B, Hkv, stop - start, limit)                  # [B, Hkv, Qb, L]
        n = allowed.sum(-1)
        m = row_scale(n, params)
        qf = q[:, :, start:stop].float().view(B, Hkv, G, stop - start, D)
        for heads, is_simple in groups:
            index = torch.tensor(heads, device=q.device)
            sub = (qf.index_select(1, index), k[:, :, :limit].index_select(1, index),
                   v[:, :, :limit].index_select(1, index), allowed.index_select(1, index))
            if len(heads) == Hkv:
                sub = (qf, k[:, :, :limit], v[:, :, :limit], allowed)
            if is_simple:
                res = _softmax_rows(*sub, m.index_select(1, index), scale)
            else:
                res = _custom_rows(*sub, n.index_select(1, index), m.index_select(1, index), scale,
                                   params.select(heads))
            q_index = (index[:, None] * G + torch.arange(G, device=q.device)).reshape(-1)
            out[:, q_index, start:stop] = res.reshape(B, len(heads) * G, stop - start, D).to(q.dtype)
    return out
