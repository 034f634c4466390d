"""Fast torch softplus attention for CPUs: query blocks over only the key slots they can read.

Same signature and result as ``naive.softplus_attention``. The re-weighting needs each row's l1
normaliser (and its largest weight) before any weight is final, so every row is computed whole:
queries go in blocks sized so one block's fp32 scores stay near ``BLOCK_BYTES``, and a 16k-token
prefill never holds an ``N x N`` matrix for all heads. A block reads only the slots up to the last
one whose position it can reach (the causal prefix when slots are in position order: prefill, a
compacted cache plus new keys), so a prefill does about half of the ``Q x S`` products; windows
shrink the KV held, not this work.

Heads are split into groups of one kind of math:

* ``exp`` without re-weighting: softmax of ``m(n) s``, torch's fused ``scaled_dot_product_attention``
  on queries multiplied by ``m(n)``;
* ``softplus`` (any ``p``) and ``exp`` with re-weighting: the unnormalised weights ``e = phi(m s)``
  (``exp(m s - max)`` for exp) are made in place; without re-weighting the output is
  ``(e @ v) / sum e``; with it, ``ReLU(n A - 1) = n ReLU(e - Z / n) / Z`` (``Z = sum e``), so the
  weights are ``(ReLU(e - Z / n) / max)^p`` and the output ``(w @ v) / sum w``: no pass divides
  the full rows by ``Z``.

A softplus row whose every readable score underflows (``sum e < 1e-30``, all ``m s < -69``) is
recomputed by the reference, which works with logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sink_window.naive import visible
from .naive import logits, reweighted
from .naive import HeadParams, row_scale

#: Target bytes of one block's fp32 scores (all heads); the query block is sized from it.
BLOCK_BYTES = 8 * 2**20
MIN_BLOCK, MAX_BLOCK = 16, 512
#: A softplus row normaliser below this is recomputed with logits (the reference).
UNDERFLOW = 1e-30


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


def _softmax_rows(qf, k, v, allowed, n, m, scale, params) -> torch.Tensor:
    """Exp heads without re-weighting: fused sdpa on ``m``-scaled queries.

    ``qf [B, Hs, G, Qb, D]`` fp32, ``k, v [B, Hs, S, D]``, ``allowed [B, Hs, Qb, S]``, ``n, m [B, Hs, Qb]``
    -> ``[B, Hs, G, Qb, D]`` fp32 (rows with nothing readable: 0)."""
    B, Hs, G, Qb, D = qf.shape
    S = k.shape[2]
    qs = (qf * m[:, :, None, :, None]).reshape(B, Hs, G * Qb, D)
    mask = allowed[:, :, None].expand(B, Hs, G, Qb, S).reshape(B, Hs, G * Qb, S)
    out = F.scaled_dot_product_attention(qs, k.float(), v.float(), attn_mask=mask, scale=scale)
    return out.view(B, Hs, G, Qb, D).masked_fill((n == 0)[:, :, None, :, None], 0.0)


def _weighted_rows(qf, k, v, allowed, n, m, scale, params) -> torch.Tensor:
    """Softplus heads, or exp heads with re-weighting, of one kind (shapes as ``_softmax_rows``)."""
    B, Hs, G, Qb, D = qf.shape
    S = k.shape[2]
    hidden = ~allowed[:, :, None]                                               # [B, Hs, 1, Qb, S]
    e = torch.matmul(qf.reshape(B, Hs, G * Qb, D), k.float().transpose(-1, -2)).view(B, Hs, G, Qb, S)
    e.mul_((m * scale)[:, :, None, :, None])                                    # x = m s
    softplus = bool(params.softplus[0])
    if softplus:
        e = F.softplus(e).masked_fill_(hidden, 0.0)
    else:
        e.masked_fill_(hidden, float("-inf"))
        top = e.amax(-1, keepdim=True)
        e.sub_(top.masked_fill_(top == float("-inf"), 0.0)).exp_()             # exp(x - max), 0 where hidden
    total = e.sum(-1, keepdim=True)                                             # Z
    power = params.power.view(1, Hs, 1, 1, 1)
    rows = (n > 0)[:, :, None, :, None].expand(B, Hs, G, Qb, 1)
    lost = rows & (total < UNDERFLOW) if softplus else None                     # every softplus(x) underflowed
    if bool((params.power > 0).any()):
        e.sub_(total / n.clamp(min=1)[:, :, None, :, None].float()).clamp_(min=0.0)   # ReLU(e - Z / n)
        top = e.amax(-1, keepdim=True)
        flat = rows & (top <= 0)                                                # nothing above 1/n: keep A
        e.div_(torch.where(top > 0, top, 1.0))
        _power_(e, params.power, power)
        if bool(flat.any()):
            index = flat[..., 0].nonzero(as_tuple=True)
            e[index] = allowed[:, :, None].expand(B, Hs, G, Qb, S)[index].float()
        total = e.sum(-1, keepdim=True)
    out = torch.matmul(e.view(B, Hs, G * Qb, S), v.float()).view(B, Hs, G, Qb, D)
    out = out / torch.where(total > 0, total, 1.0)
    if softplus:
        if bool(lost.any()):
            out = _recompute_rows(out, lost[..., 0], qf, k, v, allowed, n, m, scale, params)
    return out.masked_fill_(~rows, 0.0)


def _power_(w: torch.Tensor, powers: torch.Tensor, power: torch.Tensor) -> None:
    """``w ** p`` in place for ``w`` in ``[0, 1]``: repeated products for one small whole ``p``,
    else ``exp(p log w)`` (vectorised; ``torch.pow`` with a general exponent is several times slower)."""
    p = float(powers[0])
    if bool((powers == p).all()) and p == int(p) and p <= 4:
        w.pow_(p)
    else:
        w.log_().mul_(power).exp_()


def _recompute_rows(out, lost, qf, k, v, allowed, n, m, scale, params) -> torch.Tensor:
    """Rows ``lost [B, Hs, G, Qb]`` through the reference's logits (softplus normaliser underflowed)."""
    for b, h, g, i in lost.nonzero().tolist():
        x = (qf[b, h, g, i] @ k[b, h].float().T) * (scale * m[b, h, i])                 # [S]
        lg = logits(x, torch.tensor(True)).masked_fill(~allowed[b, h, i], float("-inf"))
        probs = torch.softmax(lg, -1)
        probs = reweighted(probs, n[b, h, i], params.power[h])
        out[b, h, g, i] = probs @ v[b, h].float()
    return out


def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       sink: torch.Tensor, span: torch.Tensor, scale: float, params: HeadParams,
                       query_block: int | None = None) -> torch.Tensor:
    """``[B, H, Q, D]`` in ``q.dtype``; arguments as ``naive.softplus_attention`` (``query_block``:
    queries per block, default sized from ``BLOCK_BYTES``)."""
    B, H, Q, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    out = q.new_zeros(B, H, Q, D)
    # heads of one kind of math: (exp, p = 0) -> sdpa; otherwise by nonlinearity and whether p > 0
    kinds: dict[tuple[bool, bool], list[int]] = {}
    for h in range(Hkv):
        kinds.setdefault((bool(params.softplus[h]), bool(params.power[h] > 0)), []).append(h)
    groups = [(heads, _softmax_rows if key == (False, False) else _weighted_rows) for key, heads in kinds.items()]
    block = query_block or _block_size(B, H, S)
    for start in range(0, Q, block):
        stop = min(Q, start + block)
        qp = q_pos[:, start:stop]
        limit = _reachable_slots(k_pos, int(qp.max()))
        if limit == 0:
            continue
        allowed = visible(qp, k_pos[..., :limit], sink, span).expand(B, Hkv, stop - start, limit)   # [B, Hkv, Qb, L]
        n = allowed.sum(-1)
        m = row_scale(n, params)
        qf = q[:, :, start:stop].float().reshape(B, Hkv, G, stop - start, D)
        for heads, rows in groups:
            if len(heads) == Hkv:
                res = rows(qf, k[:, :, :limit], v[:, :, :limit], allowed, n, m, scale, params)
                out[:, :, start:stop] = res.reshape(B, H, stop - start, D).to(q.dtype)
                continue
            index = torch.tensor(heads, device=q.device)
            res = rows(qf.index_select(1, index), k[:, :, :limit].index_select(1, index),
                       v[:, :, :limit].index_select(1, index), allowed.index_select(1, index),
                       n.index_select(1, index), m.index_select(1, index), scale, params.select(heads))
            q_index = (index[:, None] * G + torch.arange(G, device=q.device)).reshape(-1)
            out[:, q_index, start:stop] = res.reshape(B, len(heads) * G, stop - start, D).to(q.dtype)
    return out
