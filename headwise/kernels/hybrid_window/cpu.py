"""Hybrid window attention for CPUs: cost scales with the kept keys (sink + window), never ``N x N``.

Same signature and result as ``naive.hybrid_window_attention``. Two paths:

* **Direct** (at most ``DIRECT_MAX_QUERIES`` queries, i.e. decode over a ring-ordered cache): one
  fp32 masked attention over every slot, already small (``sink + window`` slots).
* **Blocked** (prefill): per sequence, the key slots are put in position order (a no-op when they
  already are), KV heads with the same sink, span and key positions run together, and each block
  of ``QUERY_BLOCK`` queries reads two slot ranges found by one ``searchsorted`` for all blocks:
  the sink ``[0, sink)`` and its window band ``[q_min - span + 1, q_max]``, with a small
  ``[block, keys]`` mask. The row maximum the definition needs comes from those scores.

Math is fp32; the output has ``q``'s dtype.
"""

from __future__ import annotations

import torch

from .naive import combine, visible

#: Queries per block of the blocked path; a block reads ``sink + span + QUERY_BLOCK`` keys at most.
QUERY_BLOCK = 128
#: Up to this many queries the direct path runs.
DIRECT_MAX_QUERIES = 16
#: Key position given to empty slots so that sorting puts them last.
PAST_END = torch.iinfo(torch.int64).max


def hybrid_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                            lin_num: torch.Tensor, lin_den: torch.Tensor, query_block: int = QUERY_BLOCK
                            ) -> torch.Tensor:
    """Shapes as ``naive.hybrid_window_attention``; ``query_block`` queries per block of the blocked path."""
    if q.shape[2] <= DIRECT_MAX_QUERIES:
        return direct(q, k, v, q_pos, k_pos, sink, span, scale, lin_num, lin_den)
    return blocked(q, k, v, q_pos, k_pos, sink, span, scale, lin_num, lin_den, query_block)


def direct(q, k, v, q_pos, k_pos, sink, span, scale, lin_num, lin_den) -> torch.Tensor:
    """One fp32 masked attention over every slot (shapes as ``hybrid_window_attention``)."""
    B, H, Q, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    allowed = visible(q_pos, k_pos, sink, span).expand(B, Hkv, Q, S)[:, :, None]      # [B, Hkv, 1, Q, S]
    qf = q.float().reshape(B, Hkv, G * Q, D)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).view(B, Hkv, G, Q, S) * scale
    out = combine(scores, allowed, v.float()[:, :, None], lin_num.float().reshape(B, Hkv, G, Q, D),
                  lin_den.float().reshape(B, Hkv, G, Q))
    out = out.masked_fill((q_pos < 0)[:, None, None, :, None], 0.0)
    return out.reshape(B, H, Q, D).to(q.dtype)


def blocked(q, k, v, q_pos, k_pos, sink, span, scale, lin_num, lin_den, query_block: int = QUERY_BLOCK):
    """The blocked path (shapes as ``hybrid_window_attention``)."""
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if k_pos.shape[1] > 1 and bool((k_pos == k_pos[:, :1]).all()):
        k_pos = k_pos[:, :1]                      # per-head positions that agree: sort once
    out = q.new_zeros(B, H, Q, D)
    sinks, spans = sink.tolist(), span.tolist()
    nblocks = -(-Q // query_block)
    padded = torch.nn.functional.pad(q_pos, (0, nblocks * query_block - Q), value=-1).view(B, nblocks, query_block)
    real = padded >= 0
    q_max = padded.max(-1).values                                                        # [B, M]
    q_min = torch.where(real.any(-1), padded.masked_fill(~real, PAST_END).min(-1).values, q_max)
    for b in range(B):
        pos, kb, vb = _position_order(k[b], v[b], k_pos[b])                              # [Hk, S], [Hkv, S, D]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for h in range(Hkv):
            groups.setdefault((sinks[h], spans[b][h], h if pos.shape[0] > 1 else 0), []).append(h)
        for (s, w, row), heads in groups.items():
            keys = pos[row].contiguous()
            bounds = torch.stack([torch.minimum(torch.full_like(q_max[b], s), q_max[b] + 1),
                                  torch.clamp(q_min[b] - w + 1, min=s), q_max[b] + 1], dim=-1)   # [M, 3]
            slots = torch.searchsorted(keys, bounds.reshape(-1)).view(nblocks, 3).tolist()
            index = torch.tensor(heads, device=q.device)
            kh, vh = kb.index_select(0, index).float(), vb.index_select(0, index).float()      # [h, S, D]
            qh = q[b].view(Hkv, G, Q, D).index_select(0, index)
            num_h = lin_num[b].view(Hkv, G, Q, D).index_select(0, index)
            den_h = lin_den[b].view(Hkv, G, Q).index_select(0, index)
            for m, (a, c, d) in enumerate(slots):
                if q_max[b, m] < 0:
                    continue                                                         # padding only
                start, stop = m * query_block, min(Q, (m + 1) * query_block)
                parts = [slice(0, a)] if a > 0 else []
                if d > c:
                    parts.append(slice(c, d))
                qp = q_pos[b, start:stop, None]                                       # [n, 1]
                if parts:
                    kp = torch.cat([keys[p] for p in parts]) if len(parts) > 1 else keys[parts[0]]
                    ks = torch.cat([kh[:, p] for p in parts], 1) if len(parts) > 1 else kh[:, parts[0]]
                    vs = torch.cat([vh[:, p] for p in parts], 1) if len(parts) > 1 else vh[:, parts[0]]
                    kp = kp[None]
                    allowed = (kp >= 0) & (kp <= qp) & ((kp < s) | (kp > qp - w)) & (qp >= 0)             # [n, K]
                    scores = torch.matmul(qh[:, :, start:stop].float(), ks[:, None].transpose(-1, -2)) * scale
                else:                                                                # no exact key in reach
                    ks = kh[:, :0]
                    vs = vh[:, :0]
                    allowed = torch.zeros(stop - start, 0, dtype=torch.bool, device=q.device)
                    scores = qh.new_zeros(len(heads), G, stop - start, 0, dtype=torch.float32)
                block = combine(scores, allowed, vs[:, None], num_h[:, :, start:stop].float(),
                                den_h[:, :, start:stop].float())                     # [h, G, n, D]
                block = block.masked_fill((qp[:, 0] < 0)[None, None, :, None], 0.0)
                out[b].view(Hkv, G, Q, D)[index, :, start:stop] = block.to(q.dtype)
    return out


def _position_order(k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor):
    """One sequence's slots in position order: ``k, v [Hkv, S, D]``, ``k_pos [Hk, S]`` ->
    ``(pos [Hk, S], k, v)``, ``pos`` rows non-decreasing with empty slots read as -1 (all first) or
    ``PAST_END`` (last); ``k, v`` are gathered only when slots move."""
    if bool((k_pos[:, 1:] >= k_pos[:, :-1]).all()):
        return k_pos, k, v
    past_end = k_pos.masked_fill(k_pos < 0, PAST_END)
    if bool((past_end[:, 1:] >= past_end[:, :-1]).all()):
        return past_end, k, v
    past_end, order = torch.sort(past_end, dim=-1, stable=True)
    index = order.expand(k.shape[0], -1)[..., None].expand(-1, -1, k.shape[-1])
    return past_end, k.gather(1, index), v.gather(1, index)
