"""Fast torch sink + window attention for CPUs: cost scales with kept keys, never with ``N x N``.

Same signature and result as ``naive.sink_window_attention``. Two paths:

* **Banded** (more than ``DIRECT_MAX_QUERIES`` queries, i.e. prefill): per sequence the key slots
  are put in position order (free when they already are: prefill without cache, left or right
  padding, a compacted cache followed by new keys; otherwise one ``sort`` + gather per KV head).
  KV heads with the same sink, span and key positions run together, their GQA query heads folded
  into the query axis. Queries go in blocks of ``query_block``:

  - a *band* block (a full block of consecutive real query positions ``q0..q1`` whose windows all
    start past the sink, keys ``0..n-1`` in consecutive slots: most of every long prefill) reads its
    window keys ``[q0 - span + 1, q1]`` as one contiguous slice with a ``[block, span + block - 1]``
    mask that is the same for every band block, and its sink without one: consecutive band blocks
    run as one batched masked call of torch's CPU flash attention over a strided view of the keys (no
    copy) and one over the sink, merged exactly by the log-sum-exps flash attention also returns;
  - another *regular* block splits its visible keys into mask-free flash pieces merged the same
    way: ``full`` (sink + window interior, seen by every query), ``causal`` (the diagonal square)
    and ``reverse`` (the window's lower edge, causal once queries and keys are reversed); blocks
    whose every window reaches the sink are plain causal (``full`` + ``causal``).
  - any other block reads two key slices found by binary search (its heads' sink ``[0, sink)``
    and its window band ``[q_min - span + 1, q_max]``) with a small ``[block, slice]`` mask.

* **Direct** (few queries, i.e. decode over a ring-ordered cache): one fp32 masked attention over
  all slots; its cost is ``Q x S`` with ``S`` the kept slots, already small.

Math is fp32 (bf16/fp16 inputs are upcast slice by slice); the output has ``q``'s dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .naive import visible

#: Queries per block of the banded path; the band read per block is ``span + query_block`` keys.
QUERY_BLOCK = 256
#: Key position given to empty slots when sorting puts them last.
PAST_END = torch.iinfo(torch.int64).max
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
    qf = q.float().reshape(B, Hkv, G * Q, D)     # q may be a transposed view (HF)
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
        layouts = [_KeyLayout.of(row) for row in pos]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for h in range(Hkv):
            row = h if pos.shape[0] > 1 else 0
            groups.setdefault((sink_list[h], span_rows[b][h], row), []).append(h)
        q_rows = q_pos[b]
        runs = _QueryRuns(q_rows)
        for (s, w, row), heads in groups.items():
            heads_t = torch.tensor(heads, device=q.device)
            keys = _Keys(pos[row].contiguous(), kb[heads_t].float(), vb[heads_t].float(), layouts[row])
            q_heads = q[b].view(Hkv, G, Q, D)[heads_t].float()                    # [h, G, Q, D]
            size = band_block(w, query_block)
            band_starts = []
            for start in range(0, Q, size):
                stop = min(Q, start + size)
                run = runs.consecutive(start, stop)
                if run and stop - start == size and _is_band(*run, s, w) and keys.layout.holds_band(*run, s, w):
                    band_starts.append(start)            # done together below
                    continue
                regular = runs.regular(start, stop, keys)
                block = _attend_block(q_heads[:, :, start:stop], keys, q_rows[start:stop], regular, s, w, scale)
                if block is not None:
                    out[b].view(Hkv, G, Q, D)[heads_t, :, start:stop] = block.to(q.dtype)
            for starts, blocks in _band_blocks(q_heads, keys, q_rows, band_starts, size, s, w, scale):
                for start, block in zip(starts, blocks):
                    out[b].view(Hkv, G, Q, D)[heads_t, :, start:start + size] = block.to(q.dtype)
    return out


#: The smallest query block ``band_block`` picks for a short window.
MIN_BAND_BLOCK = 32


def band_block(span: int, query_block: int) -> int:
    """Queries per block for heads of window ``span``: ``query_block``, or for a window of
    ``MIN_BAND_BLOCK < span <= query_block`` the largest power of two below the span, so the blocks are
    band blocks (``_is_band``: the window is longer than the block) that run batched and mask-free
    (``_band_blocks``) instead of one masked call per block: 15-25% less time for windows of 64-256 on
    an 8k prompt (measured on this project's CPU, docs/kernels.md)."""
    if span > query_block or span <= MIN_BAND_BLOCK:
        return query_block
    return 1 << ((span - 1).bit_length() - 1)           # largest power of two < span (>= MIN_BAND_BLOCK)


#: Bytes of gathered keys and values one batched band call may hold.
BAND_BATCH_BYTES = 64 << 20


class _QueryRuns:
    """Which query blocks are *regular*: consecutive real positions whose keys are all present.

    Answers from Python lists, so the per-block checks of a long prefill cost no tensor ops.
    """

    def __init__(self, q_pos: torch.Tensor):
        self.first = q_pos.tolist()
        steps = (q_pos[1:] == q_pos[:-1] + 1).long().cumsum(0).tolist()
        self.breaks_before = [0, *steps]          # consecutive steps among the first i + 1 queries

    def consecutive(self, start: int, stop: int) -> tuple[int, int] | None:
        """``(q0, q1)`` when queries ``start..stop-1`` are the real positions ``q0, q0+1, ..., q1``."""
        q0, q1 = self.first[start], self.first[stop - 1]
        if q0 < 0 or self.breaks_before[stop - 1] - self.breaks_before[start] != stop - 1 - start:
            return None
        return q0, q1

    def regular(self, start: int, stop: int, keys: "_Keys") -> tuple[int, int] | None:
        """``(q0, q1)`` when queries ``start..stop-1`` are ``q0, q0+1, ..., q1`` and keys ``0..q1`` are all there."""
        run = self.consecutive(start, stop)
        if run is None or keys.first_slot is None or run[1] >= keys.count:
            return None
        return run


def _is_band(q0: int, q1: int, sink: int, span: int) -> bool:
    """A regular block whose every window starts at or after the sink and is longer than the block."""
    return q0 - span + 1 >= sink and span > q1 - q0 + 1


def _band_blocks(q: torch.Tensor, keys: "_Keys", q_pos: torch.Tensor, starts: list[int], size: int,
                 sink: int, span: int, scale: float):
    """All band blocks of a head group at once: one masked flash call over the window and one over the
    sink per batch of consecutive blocks, merged by their log-sum-exps.

    A band block's window keys ``[q0 - span + 1, q1]`` are one contiguous slice, and consecutive blocks'
    slices are ``size`` slots apart, so a batch of blocks reads them as one strided view of the group's
    keys (no copy); every block has the same ``[size, span + size - 1]`` mask (query ``i`` sees window
    keys ``i .. i + span - 1``). Torch's CPU flash attention takes the view, the mask (broadcast over
    blocks and heads) and the ``G`` query heads of each KV head (GQA). Yields ``(starts, out [n, h, G, size, D] fp32)``.
    """
    if not starts:
        return
    h, G, Q, D = q.shape
    width = span + size - 1                                      # window keys a block reads
    step = max(1, BAND_BATCH_BYTES // (3 * h * G * size * D * 4))
    k, v = keys.k.contiguous(), keys.v.contiguous()            # [h, S, D]
    mask = _band_mask(size, span, q.device)                    # [size, width]
    layout = keys.layout
    for run in _consecutive_runs(starts, [int(q_pos[start]) for start in starts], size):
        for i in range(0, len(run), step):
            chunk = run[i:i + step]
            n, start = len(chunk), chunk[0]
            qb = q[:, :, start:start + n * size].reshape(h, G, n, size, D).permute(2, 0, 1, 3, 4)
            qb = qb.reshape(n, h * G, size, D)                                             # [n, h * G, size, D]
            lo = layout.tail_slot + int(q_pos[start]) - span + 1 - layout.tail_pos        # slot of block 0's first key
            band_k, band_v = (t.as_strided((n, h, width, D), (size * D, t.stride(0), D, 1), t.storage_offset() + lo * D)
                              for t in (k, v))
            out, lse = _flash(qb, band_k, band_v, False, scale, mask)
            if sink > 0:
                at = layout.head_slot
                sink_out, sink_lse = _flash(qb, k[None, :, at:at + sink].expand(n, h, sink, D),
                                            v[None, :, at:at + sink].expand(n, h, sink, D), False, scale)
                out = sink_out.lerp_(out, torch.sigmoid(lse - sink_lse)[..., None])       # band's share of the mass
            yield chunk, out.view(n, h, G, size, D)


def _consecutive_runs(starts: list[int], positions: list[int], size: int) -> list[list[int]]:
    """Band block ``starts`` (ascending; their first queries at ``positions``) split where a block does not
    follow the one before it in the queries or in position."""
    runs: list[list[int]] = []
    for i, start in enumerate(starts):
        if i and start == starts[i - 1] + size and positions[i] == positions[i - 1] + size:
            runs[-1].append(start)
        else:
            runs.append([start])
    return runs


def _band_mask(size: int, span: int, device) -> torch.Tensor:
    """``[size, span + size - 1]`` additive mask of a band block: 0 where query ``i`` sees window key ``j``
    (``i <= j <= i + span - 1``), -inf elsewhere."""
    i = torch.arange(size, device=device)[:, None]
    j = torch.arange(span + size - 1, device=device)[None]
    seen = (j >= i) & (j <= i + span - 1)
    return torch.zeros(seen.shape, device=device).masked_fill_(~seen, float("-inf"))


class _Keys:
    """One sequence's keys of a head group in position order (see ``_keys_in_position_order``).

    ``pos [S]`` sorted positions, ``k, v [h, S, D]`` fp32, ``layout``: where runs of consecutive
    positions sit; ``first_slot``: when the real keys are exactly positions ``0..n-1`` in consecutive
    slots, the slot of position 0 (else ``None``).
    """

    def __init__(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: "_KeyLayout"):
        self.pos, self.k, self.v, self.layout = pos, k, v, layout

    @property
    def first_slot(self) -> int | None:
        return self.layout.head_slot if self.layout.contiguous_from_zero else None

    @property
    def count(self) -> int:
        return self.layout.count


@dataclass(frozen=True)
class _KeyLayout:
    """Runs of consecutive positions in a sorted ``pos [S]`` row (real keys fill slots ``head_slot`` to
    ``head_slot + count - 1``): the *head* run starts at the first real key (position ``head_pos``,
    ``head_len`` keys), the *tail* run ends at the last (position ``tail_pos`` at slot ``tail_slot``, to
    ``last_pos``). A cache that dropped old keys (a window head's ring, read back for a prompt's next
    chunk) holds its sink as the head run and its window plus the chunk as the tail run."""

    count: int = 0
    head_slot: int = 0
    head_pos: int = 0
    head_len: int = 0
    tail_slot: int = 0
    tail_pos: int = 0
    last_pos: int = -1

    @property
    def contiguous_from_zero(self) -> bool:
        return self.count > 0 and self.head_pos == 0 and self.head_len == self.count

    def holds_band(self, q0: int, q1: int, sink: int, span: int) -> bool:
        """Whether a band block of queries ``q0..q1`` finds its window ``[q0 - span + 1, q1]`` in the tail
        run and its sink ``[0, sink)`` in the head run."""
        window = q0 - span + 1 >= self.tail_pos and q1 <= self.last_pos
        return window and (sink == 0 or self.head_pos == 0 and self.head_len >= sink)

    @classmethod
    def of(cls, pos: torch.Tensor) -> "_KeyLayout":
        real = ((pos >= 0) & (pos < PAST_END)).nonzero().flatten()
        if real.numel() == 0:
            return cls()
        first, count = int(real[0]), real.numel()
        kept = pos[first:first + count]
        gaps = (kept[1:] != kept[:-1] + 1).nonzero().flatten().tolist()       # run breaks after these slots
        head_len = gaps[0] + 1 if gaps else count
        tail = gaps[-1] + 1 if gaps else 0
        return cls(count, first, int(kept[0]), head_len, first + tail, int(kept[tail]), int(kept[-1]))


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
    past_end = k_pos.masked_fill(empty, PAST_END)
    if bool((past_end[:, 1:] >= past_end[:, :-1]).all()):
        return past_end, k, v                                                   # sorted, empty slots last
    past_end, order = torch.sort(past_end, dim=-1, stable=True)
    order = order.expand(k.shape[0], -1)                                        # [Hkv, S]
    index = order[..., None].expand(-1, -1, k.shape[-1])
    return past_end, k.gather(1, index), v.gather(1, index)


def _attend_block(q: torch.Tensor, keys: _Keys, q_pos: torch.Tensor, regular: tuple[int, int] | None,
                  sink: int, span: int, scale: float) -> torch.Tensor | None:
    """Attention of one query block of heads that share sink, span and key positions.

    Args:
        q: ``[h, G, Qb, D]`` fp32; keys: the group's keys; q_pos: ``[Qb]``;
        regular: ``(q0, q1)`` from ``_QueryRuns.regular`` or ``None``; sink, span: ints.

    Returns:
        ``[h, G, Qb, D]`` fp32, or ``None`` when no query of the block sees any key (all zeros).
    """
    parts = _unmasked_parts(keys, *regular, sink, span) if regular else None
    if parts is None:
        return _masked_block(q, keys, q_pos, sink, span, scale)
    outs, lses = zip(*(_flash_part(q, keys, lo, hi, kind, scale) for kind, lo, hi in parts))
    if len(outs) == 1:
        return outs[0]
    lse = torch.stack(lses)                                                  # [parts, h, G, Qb]
    weights = torch.softmax(lse, dim=0)[..., None]                           # each part's share of the mass
    return (torch.stack(outs) * weights).sum(0)


def _unmasked_parts(keys: _Keys, q0: int, q1: int, sink: int, span: int):
    """Split a regular block's visible keys into pieces that need no mask, or ``None``.

    A block is regular when its queries are consecutive real positions ``q0..q1`` whose keys are
    all present at consecutive slots. Its visible keys are then the union of disjoint position
    ranges, each of which is a mask-free flash-attention call:

    * ``full``: seen by every query: the sink ``[0, sink)`` and the window interior
      ``[q1 - span + 2, q0)`` (or all of ``[0, q0)`` when every window reaches the sink);
    * ``causal``: the diagonal ``[q0, q1]``, key ``j`` seen by query ``i`` iff ``j <= i``;
    * ``reverse``: the window's lower edge ``[q0 - span + 1, q1 - span + 1]``, key ``j`` seen by
      query ``i`` iff ``j >= i``: causal once queries and keys are both reversed.

    Returns:
        ``[(kind, slot_lo, slot_hi), ...]`` with ``full`` given as a list of slot slices, or ``None``.
    """
    at = keys.first_slot
    parts = []
    if q1 - span + 1 <= sink:                                  # every window reaches the sink: causal
        if q0 > 0:
            parts.append(("full", [(at, at + q0)], None))
    elif _is_band(q0, q1, sink, span):
        full = [(at, at + sink)] if sink > 0 else []
        if q1 - span + 2 < q0:
            full.append((at + q1 - span + 2, at + q0))
        if full:
            parts.append(("full", full, None))
        parts.append(("reverse", at + q0 - span + 1, at + q1 - span + 2))
    else:
        return None
    parts.append(("causal", at + q0, at + q1 + 1))
    return parts


def _flash_part(q: torch.Tensor, keys: _Keys, lo, hi, kind: str, scale: float):
    """One mask-free piece: ``(out [h, G, Qb, D], logsumexp [h, G, Qb])`` fp32.

    ``full`` folds the ``G`` query heads into the query axis (all rows see the same keys);
    ``causal``/``reverse`` repeat the piece's ``Qb`` keys over the ``G`` heads instead.
    """
    h, G, Qb, D = q.shape
    if kind == "full":
        slices = lo
        k = torch.cat([keys.k[:, a:b] for a, b in slices], dim=1) if len(slices) > 1 else keys.k[:, slices[0][0]:slices[0][1]]
        v = torch.cat([keys.v[:, a:b] for a, b in slices], dim=1) if len(slices) > 1 else keys.v[:, slices[0][0]:slices[0][1]]
        out, lse = _flash(q.reshape(1, h, G * Qb, D), k[None], v[None], False, scale)
        return out.view(h, G, Qb, D), lse.view(h, G, Qb)
    k = keys.k[:, lo:hi, None].expand(h, hi - lo, G, D).transpose(1, 2).reshape(1, h * G, hi - lo, D)
    v = keys.v[:, lo:hi, None].expand(h, hi - lo, G, D).transpose(1, 2).reshape(1, h * G, hi - lo, D)
    qf = q.reshape(1, h * G, Qb, D)
    if kind == "reverse":
        out, lse = _flash(qf.flip(2), k.flip(2), v.flip(2), True, scale)
        out, lse = out.flip(2), lse.flip(2)
    else:
        out, lse = _flash(qf, k, v, True, scale)
    return out.view(h, G, Qb, D), lse.view(h, G, Qb)


def _flash(q, k, v, causal: bool, scale: float, mask: torch.Tensor | None = None):
    """torch's CPU flash attention (optionally with an additive ``mask`` broadcast over batch and heads),
    which also returns the log-sum-exp needed to merge pieces."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                        scale=scale)


def _masked_block(q: torch.Tensor, keys: _Keys, q_pos: torch.Tensor, sink: int, span: int,
                  scale: float) -> torch.Tensor | None:
    """Any block: the sink and window slices found by binary search, a small ``[Qb, K]`` mask."""
    key_pos = keys.pos
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
    ks = torch.cat([keys.k[:, sl] for sl in slots], dim=1) if len(slots) > 1 else keys.k[:, slots[0]]
    vs = torch.cat([keys.v[:, sl] for sl in slots], dim=1) if len(slots) > 1 else keys.v[:, slots[0]]
    kp = torch.cat([key_pos[sl] for sl in slots]) if len(slots) > 1 else key_pos[slots[0]]
    qp = q_pos[:, None]
    mask = (kp[None, :] <= qp) & ((kp[None, :] < sink) | (kp[None, :] > qp - span)) & (qp >= 0)   # [Qb, K]
    seen = mask.any(-1)                                                                            # [Qb]
    all_seen = bool(seen.all())
    if not all_seen:
        mask = mask | ~seen[:, None]                 # keep softmax finite; those rows are zeroed below
    h, G, Qb, D = q.shape
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q.reshape(1, h * G, Qb, D), ks[None], vs[None], attn_mask=bias,
                                         scale=scale, enable_gqa=True).view(h, G, Qb, D)
    if not all_seen:
        out = out.masked_fill(~seen[:, None], 0.0)
    return out
