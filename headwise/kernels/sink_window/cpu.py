"""Fast torch sink + window attention for CPUs: cost scales with kept keys, never with ``N x N``.

Same signature and result as ``naive.sink_window_attention``. Two paths:

* **Banded** (many queries, i.e. prefill): per sequence, the key slots are put in position order
  (free when they already are: prefill without cache, left or right padding, or a compacted cache
  followed by new keys; otherwise one ``argsort`` + gather per KV head). Queries then go in blocks
  of ``query_block``; a block reads only two key slices found by binary search, its heads' sink
  ``[0, sink)`` and its window band ``[q_min - span + 1, q_max]``, and runs
  ``scaled_dot_product_attention`` on them in fp32 with a small ``[block, slice]`` mask. KV heads
  of a sequence with the same sink, span and key positions run together, their GQA query heads
  folded into the query axis, so a uniform plan makes one call per query block.
* **Direct** (few queries, i.e. decode over a ring-ordered cache): one fp32 masked attention over
  all slots; its cost is ``Q x S`` with ``S`` the kept slots, already small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import visible

#: Queries per block of the banded path; the band read per block is ``span + query_block`` keys.
QUERY_BLOCK = 256
#: Up to this many queries the direct path (one masked attention over all slots) runs.
DIRECT_MAX_QUERIES = 16


def sink_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                          k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                          query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """Causal attention where every KV head reads its sink and its own local window.

    Args:
        q: ``[B, H, Q, D]`` queries, float dtype (query head ``i`` reads KV head ``i // (H // Hkv)``).
        k, v: ``[B, Hkv, S, D]`` keys and values in any slot order.
        q_pos: ``[B, Q]`` int64 query positions, -1 for padding queries.
        k_pos: ``[B, Hk, S]`` int64 key positions (``Hk`` is 1 or ``Hkv``), -1 for empty slots.
        sink: ``[Hkv]`` int64; span: ``[B, Hkv]`` int64 (see ``naive.visible``).
        scale: softmax scale.
        query_block: queries per block of the banded path.

    Returns:
        ``[B, H, Q, D]`` in ``q.dtype``; queries that see no key get zeros.
    """
    if q.shape[2] <= DIRECT_MAX_QUERIES:
        return direct_attention(q, k, v, q_pos, k_pos, sink, span, scale)
    return banded_attention(q, k, v, q_pos, k_pos, sink, span, scale, query_block)


def direct_attention(q, k, v, q_pos, k_pos, sink, span, scale) -> torch.Tensor:
    """One fp32 masked attention over every slot (shapes as ``sink_window_attention``)."""
    B, H, Q, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    allowed = visible(q_pos, k_pos, sink, span).expand(B, Hkv, Q, S)             # [B, Hkv, Q, S]
    qf = q.float().view(B, Hkv, G * Q, D)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).view(B, Hkv, G, Q, S) * scale
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                         # empty rows -> 0
    out = torch.matmul(probs.view(B, Hkv, G * Q, S), v.float())
    return out.view(B, H, Q, D).to(q.dtype)


def banded_attention(q, k, v, q_pos, k_pos, sink, span, scale, query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """The banded path (shapes as ``sink_window_attention``)."""
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if k_pos.shape[1] > 1 and bool((k_pos == k_pos[:, :1]).all()):
        k_pos = k_pos[:, :1]                      # per-head positions that agree: sort once
    out = q.new_zeros(B, H, Q, D)
    sink_list = sink.tolist()
    span_rows = span.tolist()
    for b in range(B):
        pos, kb, vb = _keys_in_position_order(k[b], v[b], k_pos[b])            # [Hk, S], [Hkv, S, D] x2
        groups: dict[tuple[int, int, int], list[int]] = {}
        for h in range(Hkv):
            row = h if pos.shape[0] > 1 else 0
            groups.setdefault((sink_list[h], span_rows[b][h], row), []).append(h)
        q_rows = q_pos[b]
        for (s, w, row), heads in groups.items():
            heads_t = torch.tensor(heads, device=q.device)
            key_rows = pos[row].contiguous()
            q_heads = q[b].view(Hkv, G, Q, D)[heads_t]                            # [h, G, Q, D]
            k_heads, v_heads = kb[heads_t], vb[heads_t]                           # [h, S, D]
            for start in range(0, Q, query_block):
                stop = min(Q, start + query_block)
                block = _attend_block(q_heads[:, :, start:stop], k_heads, v_heads, q_rows[start:stop],
                                      key_rows, s, w, scale)
                if block is not None:
                    out[b].view(Hkv, G, Q, D)[heads_t, :, start:stop] = block.to(q.dtype)
    return out


def _keys_in_position_order(k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor):
    """One sequence's keys with slots sorted by position.

    Args:
        k, v: ``[Hkv, S, D]``; k_pos: ``[Hk, S]`` int64, -1 for empty slots.

    Returns:
        ``(pos [Hk, S], k, v)`` where each ``pos`` row is non-decreasing once empty slots are read
        as -1 (left of every real key) or as a huge value (right of every real key), so binary
        search finds position ranges; ``k, v`` are reordered to match only when needed.
    """
    empty = k_pos < 0
    if bool((k_pos[:, 1:] >= k_pos[:, :-1]).all()):
        return k_pos, k, v                                                      # sorted, empty slots first
    past_end = k_pos.masked_fill(empty, torch.iinfo(torch.int64).max)
    if bool((past_end[:, 1:] >= past_end[:, :-1]).all()):
        return past_end, k, v                                                   # sorted, empty slots last
    past_end, order = torch.sort(past_end, dim=-1, stable=True)
    order = order.expand(k.shape[0], -1)                                        # [Hkv, S]
    index = order[..., None].expand(-1, -1, k.shape[-1])
    return past_end, k.gather(1, index), v.gather(1, index)


def _attend_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  key_pos: torch.Tensor, sink: int, span: int, scale: float) -> torch.Tensor | None:
    """Attention of one query block of heads that share sink, span and key positions.

    Args:
        q: ``[h, G, Qb, D]``; k, v: ``[h, S, D]`` in position order; q_pos: ``[Qb]``;
        key_pos: ``[S]`` sorted (see ``_keys_in_position_order``); sink, span: ints.

    Returns:
        ``[h, G, Qb, D]`` fp32, or ``None`` when no query of the block sees any key (all zeros).
    """
    real = q_pos >= 0
    if not bool(real.any()):
        return None
    q_min = int(q_pos[real].min())
    q_max = int(q_pos.max())
    window_lo = max(sink, q_min - span + 1, 0)
    bounds = torch.tensor([0, min(sink, q_max + 1), window_lo, q_max + 1], device=key_pos.device)
    a, b, c, d = torch.searchsorted(key_pos, bounds).tolist()
    if b <= a and d <= c:
        return None
    slots = [sl for sl in (slice(a, b), slice(c, d)) if sl.stop > sl.start]
    ks = torch.cat([k[:, sl] for sl in slots], dim=1) if len(slots) > 1 else k[:, slots[0]]
    vs = torch.cat([v[:, sl] for sl in slots], dim=1) if len(slots) > 1 else v[:, slots[0]]
    kp = torch.cat([key_pos[sl] for sl in slots]) if len(slots) > 1 else key_pos[slots[0]]
    qp = q_pos[:, None]
    mask = (kp[None, :] <= qp) & ((kp[None, :] < sink) | (kp[None, :] > qp - span)) & (qp >= 0)   # [Qb, K]
    seen = mask.any(-1)                                                                            # [Qb]
    all_seen = bool(seen.all())
    if not all_seen:
        mask = mask | ~seen[:, None]                 # keep softmax finite; those rows are zeroed below
    h, G, Qb, D = q.shape
    out = F.scaled_dot_product_attention(
        q.float().reshape(h, G * Qb, D), ks.float(), vs.float(),
        attn_mask=mask.repeat(G, 1), scale=scale).view(h, G, Qb, D)
    if not all_seen:
        out = out.masked_fill(~seen[:, None], 0.0)
    return out
