"""Adapter from vLLM's CPU paged KV cache to headwise's ``paged_decode`` / ``sink_window`` contracts.

No vLLM import: this module works on plain tensors, so it is tested without starting vLLM.

vLLM's CPU cache of one layer is one tensor ``kv_cache [P, Hkv, bs, 2*D]``: each ``(block, KV
head)`` cell holds ``bs * D`` key values then ``bs * D`` value values. vLLM's own write op stores
keys transposed (``[D, bs]``, ISA ``"vec"``) or in other ISA-specific layouts; for the layers a plan
changes, the plugin writes the cell itself with ``write`` as plain ``[bs, D]`` keys then ``[bs, D]``
values, so gathering a page is a plain copy (a transposing gather of the keys cost 10x more,
measured) and the layout does not depend on the CPU's ISA. All-dense layers keep vLLM's layout.

Positions are not stored: position ``p`` of a sequence lives in block ``block_table[p // bs]`` at
offset ``p % bs``, unless the entry is vLLM's null block (the KV manager gave that block back:
``kv_spec.SinkWindowManager``). The adapter turns that into the contracts' explicit positions:

* ``write(kv_cache, key, value, slot_mapping)`` stores a step's keys and values;
* ``pools(kv_cache)`` views the cache as per-head pools ``[P * Hkv, bs, 1, D]`` (pool block
  ``b * Hkv + h`` is KV head ``h`` of vLLM block ``b``), the ``Hb = 1`` layout of ``paged_decode``;
* ``StepLayout`` builds, once per model step, ``pos_pool [P * Hkv, bs]`` from the block tables;
* ``decode_tables`` picks, per sequence and KV head, only the blocks holding its sink and its
  window (dense heads: every block), so a window head reads ``sink + span`` tokens, not ``N``.

Span rule: ``N`` is the sequence's length at the end of this step (vLLM's ``seq_lens``), for every
query of the step, as ``headwise.patch_model`` without ``expected_length``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ...kernels.paged_decode import native, paged_decode, paged_decode_logical
from ...kernels.paged_decode.naive import gather_pages
from ...kernels.sink_window import sink_window_attention
from ...patches.runtime import LayerRule
from .kv_memory import LayerKeep


#: vLLM's null block: the block id a block table holds where the KV manager gave a block back
#: (``BlockPool.null_block``, the pool's first block, never handed to a request). Its slots get
#: position -1, so a read through a freed entry sees no key.
NULL_BLOCK = 0

#: Bytes of keys + values (fp32) one ``paged_decode`` call may gather; decode rows are split to
#: stay under it. 0 (the default): one call for all rows. Splitting into 1 MB gathers was 8x slower
#: at 8k x 8 sequences (measured with the first, transposed-key layout), so it is off.
DECODE_GATHER_BYTES = 0

#: ``PositionBuffer.fill`` on CPU tables with numpy (called once per KV cache group and step: ~20 small
#: torch ops cost more than the writes); ``False``: the torch path of other devices.
NUMPY_FILL = True


def cells(kv_cache: torch.Tensor) -> torch.Tensor:
    """``[P, Hkv, 2, bs, D]`` view of one layer's cache: ``[..., 0, :, :]`` keys, ``[..., 1, :, :]`` values."""
    P, Hkv, bs, D2 = kv_cache.shape
    return kv_cache.view(P, Hkv, 2, bs, D2 // 2)


def write(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values at their slots.

    Args:
        kv_cache: ``[P, Hkv, bs, 2*D]`` one layer's cache.
        key, value: ``[T, Hkv, D]``; slot_mapping: ``[T]`` int, ``block * bs + offset`` of each token,
            negative for padding tokens (not stored).
    """
    bs = kv_cache.shape[2]
    slots = slot_mapping[: key.shape[0]].long()
    real = slots >= 0
    if not bool(real.all()):
        slots, key, value = slots[real], key[real], value[real]
    c = cells(kv_cache)
    block, offset = slots // bs, slots % bs
    c[block, :, 0, offset] = key.to(kv_cache.dtype)                    # [T, Hkv, D]
    c[block, :, 1, offset] = value.to(kv_cache.dtype)


def slot_pools(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views ``[P, bs, Hkv, D]`` of a cache written by ``write`` (every KV head of a vLLM block
    in one pool block: ``paged_decode_logical``'s layout; strided, no copy)."""
    c = cells(kv_cache)
    return c[:, :, 0].permute(0, 2, 1, 3), c[:, :, 1].permute(0, 2, 1, 3)


def pools(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head key and value pools over a cache written by ``write`` (views, no copy).

    Args:
        kv_cache: ``[P, Hkv, bs, 2*D]`` one layer's cache.

    Returns:
        ``(k_pool, v_pool)``, each ``[P * Hkv, bs, 1, D]``: pool block ``b * Hkv + h`` is KV head
        ``h`` of vLLM block ``b``.
    """
    P, Hkv, bs, D2 = kv_cache.shape
    c = cells(kv_cache).view(P * Hkv, 2, bs, 1, D2 // 2)
    return c[:, 0], c[:, 1]


@dataclass
class Prefill:
    """One sequence of the step with more than one query token, or a one-token prompt chunk.

    ``start:end`` are its tokens in the step's flattened ``[T, ...]`` tensors, ``context`` the
    tokens it had before this step, ``length`` its length after it.
    """

    row: int
    start: int
    end: int
    context: int
    length: int


@dataclass
class StepLayout:
    """What every headwise layer of one model step needs, computed once from vLLM's metadata.

    Attributes:
        block_size, num_kv_heads: the cache geometry.
        raw_table: ``[B, max_blocks]`` int, vLLM's block table as the worker has it (entries the KV manager
            gave back may still name their blocks); read only where each head's sink and window entries are
            read (``paged_decode_logical``), which never reach a given-back entry.
        block_table (property): ``raw_table`` with every entry the step does not read nulled (``unread``,
            e.g. ``null_unread``), made on first use: what every other reader takes.
        seq_lens: ``[B]`` int64 lengths after this step (``N`` of the span rule).
        decode_rows, decode_tokens: ``[Bd]`` int64: sequences with one query token and that
            token's index in the step.
        prefills: the other sequences.
        positions: the KV cache group's ``PositionBuffer`` (``None``: a fresh pool this step).
    """

    block_size: int
    num_kv_heads: int
    raw_table: torch.Tensor
    seq_lens: torch.Tensor
    decode_rows: torch.Tensor
    decode_tokens: torch.Tensor
    prefills: list[Prefill]
    positions: "PositionBuffer | None" = field(default=None, repr=False)
    unread: "Callable[[torch.Tensor], torch.Tensor] | None" = field(default=None, repr=False)
    _pos_pool: torch.Tensor | None = field(default=None, repr=False)
    _cached: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
              block_size: int, num_kv_heads: int, positions: "PositionBuffer | None" = None,
              prefilling: torch.Tensor | None = None,
              unread: "Callable[[torch.Tensor], torch.Tensor] | None" = None) -> "StepLayout":
        """From vLLM's ``query_start_loc [B+1]``, ``seq_lens [B]`` and ``block_table [B, M]``;
        ``positions``: the group's buffer kept across steps (default: a fresh pool); ``prefilling``:
        ``[B]`` bool, vLLM's ``is_prefilling``: a one-token prompt chunk (the last token of a prompt
        the token budget cut there) is a prefill, read by the prefill rule (default: every one-token
        row is a decode); ``unread``: ``table -> table`` nulling the entries no query of the step reads
        (``block_table``; default: none)."""
        B = seq_lens.shape[0]
        starts = query_start_loc[:B + 1].tolist()
        lengths = seq_lens[:B].tolist()
        in_prompt = prefilling[:B].tolist() if prefilling is not None else [False] * B
        decode_rows, prefills = [], []
        for b in range(B):
            q_len = starts[b + 1] - starts[b]
            if q_len == 1 and not in_prompt[b]:
                decode_rows.append(b)
            elif q_len >= 1:
                prefills.append(Prefill(b, starts[b], starts[b + 1], lengths[b] - q_len, lengths[b]))
        rows = torch.tensor(decode_rows, dtype=torch.long, device=seq_lens.device)
        return cls(block_size, num_kv_heads, block_table[:B], seq_lens[:B].long(), rows,
                   query_start_loc[rows].long(), prefills, positions, unread)

    @property
    def block_table(self) -> torch.Tensor:
        """``[B, M]`` the step's block table with the entries it does not read nulled (made on first use)."""
        if "block_table" not in self._cached:
            self._cached["block_table"] = self.raw_table if self.unread is None else self.unread(self.raw_table)
        return self._cached["block_table"]

    def cache(self, name, build):
        """``build()`` under the hashable key ``name``, computed once per step and shared by the layers that
        share this layout."""
        if name not in self._cached:
            self._cached[name] = build()
        return self._cached[name]

    def pos_pool(self, num_pool_blocks: int) -> torch.Tensor:
        """``[P * Hkv, bs]`` int64 position of every slot of the step's sequences.

        Rows of blocks the step's sequences do not hold are -1 in a fresh buffer; with a
        ``PositionBuffer`` (``positions``) they keep what an earlier step wrote, which no table of
        this step references. Entries of freed blocks (``NULL_BLOCK``) give no position. Built on
        first use and shared by the layers of the step that share this block table (one KV cache
        group).
        """
        if self._pos_pool is None or self._pos_pool.shape[0] != num_pool_blocks:
            buffer = self.positions if self.positions is not None else PositionBuffer()
            self._pos_pool = buffer.fill(self.block_table, self.seq_lens, self.block_size, self.num_kv_heads,
                                         num_pool_blocks)
        return self._pos_pool


class PositionBuffer:
    """A ``pos_pool`` kept across steps (and shared by the KV cache groups of one cache geometry): a
    step writes only the held blocks whose positions changed.

    A fresh ``[P * Hkv, bs]`` pool every step costs ``P * Hkv * bs`` writes per group, the whole
    pool (tens of MB per step when vLLM cuts its KV space into many small blocks). The positions of a
    held block depend only on its logical index ``m`` in its sequence and how many of its slots the
    sequence fills (``valid``): slot ``j`` holds ``m * bs + j`` if ``j < valid``, else -1. ``stamp``
    records, per vLLM block, the ``(m, valid)`` its rows were last written for, so a decode step
    rewrites only each sequence's last block (and blocks that changed hands or index): measured
    0.41 -> 0.11 ms per call at 8k x 8 (every block held), 0.12 -> 0.12 ms at 4k x 4. Rows of other
    blocks keep stale positions, which no block table of the step references: a block changes hands
    only through vLLM's one pool (so no block is in two groups' tables at once), and its new
    holder's rows are written before any read (its stamp differs, or its rows already hold the same
    positions).
    """

    def __init__(self) -> None:
        self.pos: torch.Tensor | None = None
        self.stamp: torch.Tensor | None = None     # [P] m * (bs + 1) + valid last written per vLLM block, -1: none

    def fill(self, block_table: torch.Tensor, seq_lens: torch.Tensor, bs: int, Hkv: int,
             num_pool_blocks: int) -> torch.Tensor:
        """Write the positions of the blocks ``block_table [B, M]`` holds for ``seq_lens [B]``; the pool
        ``[num_pool_blocks, bs]`` (``num_pool_blocks = P * Hkv``)."""
        if block_table.device.type == "cpu" and NUMPY_FILL:
            return self._fill_numpy(block_table, seq_lens, bs, Hkv, num_pool_blocks)
        return self._fill_torch(block_table, seq_lens, bs, Hkv, num_pool_blocks)

    def _fill_torch(self, block_table, seq_lens, bs, Hkv, num_pool_blocks) -> torch.Tensor:
        """``fill`` with torch ops (any device)."""
        device = block_table.device
        if self.pos is None or self.pos.shape != (num_pool_blocks, bs):
            self.pos = torch.full((num_pool_blocks, bs), -1, dtype=torch.long, device=device)
            self.stamp = torch.full((num_pool_blocks // Hkv,), -1, dtype=torch.long, device=device)
        seq_lens = seq_lens.long()
        used = (seq_lens + bs - 1) // bs                                                 # [B] blocks in use
        M = int(used.max()) if used.numel() else 0
        if M:
            live = (torch.arange(M, device=device)[None, :] < used[:, None]) & (block_table[:, :M] != NULL_BLOCK)
            # index_select / index_copy_: boolean-mask indexing took ~10 ms per call on 2 busy cores (measured)
            held = live.reshape(-1).nonzero().squeeze(1)                                 # [n]
            blocks = block_table[:, :M].reshape(-1).index_select(0, held).long()         # [n]
            m = held % M                                                                 # [n] logical index
            valid = (seq_lens.index_select(0, held // M) - m * bs).clamp(0, bs)          # [n] filled slots
            stamp = m * (bs + 1) + valid
            changed = (self.stamp.index_select(0, blocks) != stamp).nonzero().squeeze(1)
            if changed.numel():
                blocks, m, valid = blocks[changed], m[changed], valid[changed]
                slots = torch.arange(bs, device=device)
                values = torch.where(slots[None] < valid[:, None], m[:, None] * bs + slots[None], -1)  # [c, bs]
                rows = (blocks[:, None] * Hkv + torch.arange(Hkv, device=device)).reshape(-1)  # [c * Hkv]
                self.pos.index_copy_(0, rows, values[:, None, :].expand(-1, Hkv, bs).reshape(-1, bs))
                self.stamp.index_copy_(0, blocks, stamp[changed])
        return self.pos

    def _fill_numpy(self, block_table, seq_lens, bs, Hkv, num_pool_blocks) -> torch.Tensor:
        """``fill`` on the host with numpy (the same arithmetic): called once per KV cache group and step,
        where the ~20 small torch ops of the general path cost more than the writes."""
        if self.pos is None or self.pos.shape != (num_pool_blocks, bs):
            self.pos = torch.full((num_pool_blocks, bs), -1, dtype=torch.long)
            self.stamp = torch.full((num_pool_blocks // Hkv,), -1, dtype=torch.long)
        pos, stamps = self.pos.numpy(), self.stamp.numpy()                               # shared memory
        n = seq_lens.numpy().astype(np.int64)
        used = (n + bs - 1) // bs
        M = int(used.max()) if used.size else 0
        if not M:
            return self.pos
        table = block_table[:, :M].numpy()
        m = np.arange(M)
        live = (m[None, :] < used[:, None]) & (table != NULL_BLOCK)                      # [B, M]
        rows_b, m = np.nonzero(live)
        blocks = table[rows_b, m].astype(np.int64)
        valid = np.clip(n[rows_b] - m * bs, 0, bs)
        stamp = m * (bs + 1) + valid
        changed = stamps[blocks] != stamp
        if changed.any():
            blocks, m, valid = blocks[changed], m[changed], valid[changed]
            slots = np.arange(bs)
            values = np.where(slots[None] < valid[:, None], m[:, None] * bs + slots[None], -1)   # [c, bs]
            rows = (blocks[:, None] * Hkv + np.arange(Hkv)).reshape(-1)
            pos[rows] = np.repeat(values, Hkv, axis=0)
            stamps[blocks] = stamp[changed]
        return self.pos


def null_unread(block_table: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                prefilling: torch.Tensor, keep: LayerKeep, block_size: int) -> torch.Tensor:
    """A copy of a ``SinkWindowSpec`` group's block table with ``NULL_BLOCK`` where no query of the step reads.

    vLLM nulls the blocks its KV manager frees only in the scheduler's copy of a block table; the
    worker's copy (this one) keeps their ids, which the pool may have handed to another request or KV
    cache group. Reading such an entry reads another sequence's keys; filling positions for it
    overwrites the new holder's. Every block the manager may have freed lies past the sink blocks and
    before the block of ``kv_memory.LayerKeep.first_read`` (the first position any query of this step
    reads), so nulling that range drops every freed entry and nothing the step reads.

    Args:
        block_table: ``[B', M]`` int vLLM block table (``B' >= B``; rows past ``B`` are returned as they are).
        query_start_loc: ``[B + 1]`` int; seq_lens: ``[B]`` int lengths after the step;
        prefilling: ``[B]`` bool, vLLM's ``is_prefilling`` (tokens before the step ``<`` prompt length).
        keep: the group's ``kv_memory.LayerKeep``; block_size: tokens per block.

    Returns:
        ``[B', M]`` a new tensor of ``block_table``'s dtype.
    """
    # numpy on the host: called once per KV cache group per step (41 groups for d25), where ~20 small torch
    # ops cost ~0.2 ms a call (measured) and numpy's ~0.03 ms
    B = seq_lens.shape[0]
    n = seq_lens.cpu().numpy().astype(np.int64)
    starts = query_start_loc.cpu().numpy().astype(np.int64)
    pre = prefilling[:B].cpu().numpy().astype(bool)
    context = n - (starts[1:B + 1] - starts[:B])
    alpha, beta, floor = _window_arrays(keep.windows)
    at = np.where(pre, n, context + 1).astype(np.float64)[:, None]                      # [B, 1] span's N
    span = np.maximum(np.floor(alpha + beta * at), floor).clip(min=1.0)                  # [B, W] span_of
    span = np.minimum(span, at).clip(min=1.0).max(axis=1).astype(np.int64)               # [B]
    first = (context + 1 - span).clip(min=0)
    if keep.prefill_dense:
        first = np.where(pre, 0, first)
    last = first // block_size
    lo = -(-keep.sink // block_size)
    if not B or int(last.max()) <= lo:
        return block_table.clone()
    j = np.arange(block_table.shape[1])
    keep_entry = (j[None, :] < lo) | (j[None, :] >= last[:, None])                       # [B, M]
    if block_table.device.type == "cpu":
        table = block_table.numpy()
        out = np.concatenate([np.where(keep_entry, table[:B], NULL_BLOCK).astype(table.dtype), table[B:]])
        return torch.from_numpy(out)
    out = block_table.clone()
    out[:B] = torch.where(torch.from_numpy(keep_entry).to(out.device), out[:B], NULL_BLOCK)
    return out


@functools.lru_cache(maxsize=None)
def _window_arrays(windows: tuple[tuple[float, ...], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(alpha, beta, min_span)`` of ``LayerKeep.windows`` as float64 arrays ``[W]``."""
    return (np.array([w[0] for w in windows], dtype=np.float64), np.array([w[1] for w in windows], dtype=np.float64),
            np.array([w[2] if len(w) > 2 else 0 for w in windows], dtype=np.float64))


def rule_key(rule: LayerRule) -> tuple:
    """A hashable key of ``rule``'s heads ((dense, sink, alpha, beta, min_span) per KV head), kept on the rule:
    layers whose rules are equal share one ``DecodeCall`` per step."""
    key = rule._on.get("key")
    if key is None:
        key = rule._on["key"] = tuple(zip(rule.dense.tolist(), rule.sink.tolist(), rule.alpha.tolist(),
                                          rule.beta.tolist(), rule.min_span.tolist()))
    return key


@dataclass
class DecodeCall:
    """The ``paged_decode`` inputs of one layer rule for the step's decode rows, every KV head in one call;
    shared by the layers of a KV cache group whose rules are equal (``StepLayout.cache``).

    ``tables [Bd, Hkv, K]`` int32 (``decode_tables``: each head its own sink and window blocks, -1 past
    them), ``spans [Bd, Hkv]`` int64, ``sink [Hkv]`` int64, ``q_pos [Bd]`` int64 query positions.
    """

    tables: torch.Tensor
    spans: torch.Tensor
    sink: torch.Tensor
    q_pos: torch.Tensor

    @classmethod
    def build(cls, step: StepLayout, rule: LayerRule) -> "DecodeCall":
        """The inputs of ``rule`` (the calling layer's, one entry per KV head of its cache) for ``step``'s
        decode rows."""
        lengths, q_pos, spans = decode_spans(step, rule)
        table = step.cache("decode_table", lambda: step.block_table[step.decode_rows])
        return cls(layer_tables(table, lengths, rule.sink, spans, step.block_size), spans, rule.sink, q_pos)


def decode_spans(step: StepLayout, rule: LayerRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lengths [Bd], q_pos [Bd], spans [Bd, Hkv])`` int64 of ``step``'s decode rows under ``rule``, computed
    once per step (the spans once per distinct rule)."""
    lengths = step.cache("decode_lengths", lambda: step.seq_lens[step.decode_rows])
    q_pos = step.cache("decode_q_pos", lambda: lengths - 1)
    return lengths, q_pos, step.cache(("decode_spans", rule_key(rule)), lambda: rule.span(lengths))


def decode_tables(block_table: torch.Tensor, seq_lens: torch.Tensor, sink: int, span: torch.Tensor,
                  heads: list[int], block_size: int, num_kv_heads: int) -> torch.Tensor:
    """Per-head block tables reading only each head's sink and window blocks, for heads sharing one rule.

    Args:
        block_table: ``[Bd, M]`` vLLM blocks of the decoding sequences (logical order).
        seq_lens: ``[Bd]`` int64 lengths after this step; the query sits at ``seq_lens - 1``.
        sink: the heads' sink; span: ``[Bd]`` int64 their span per sequence (``N`` for dense heads).
        heads: the KV heads; block_size, num_kv_heads: cache geometry.

    Returns:
        ``[Bd, len(heads), K]`` int32 pool blocks (``b * Hkv + h``), -1 for unused entries, ``K``
        the largest number of blocks a sequence reads: ``ceil(sink / bs)`` sink blocks, then the
        blocks from the window's first position to the query's, never a block twice.
    """
    n = len(heads)
    return layer_tables(block_table, seq_lens, torch.full((n,), sink, dtype=torch.long, device=block_table.device),
                        span[:, None].expand(-1, n), block_size, heads, num_kv_heads)


def layer_tables(block_table: torch.Tensor, seq_lens: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
                 block_size: int, heads: list[int] | None = None, num_kv_heads: int | None = None) -> torch.Tensor:
    """Each head's sink and window blocks as pool block ids, every head of a layer at once.

    Args:
        block_table: ``[Bd, M]`` int vLLM blocks of the decoding sequences (logical order).
        seq_lens: ``[Bd]`` int lengths after this step (the query sits at ``seq_lens - 1``).
        sink: ``[Hg]`` int64 each head's sink; span: ``[Bd, Hg]`` int64 each head's span (``N``: dense).
        block_size: tokens per block; heads: the KV heads (default ``0..Hg-1``); num_kv_heads: heads per
            vLLM block (default ``Hg``).

    Returns:
        ``[Bd, Hg, K]`` int32 pool block ids ``b * num_kv_heads + heads[g]``: per sequence and head its
        ``ceil(sink / bs)`` sink blocks, then the blocks from the window's first position to the query's,
        never a block twice; -1 past them.
    """
    device = block_table.device
    bs = block_size
    q = (seq_lens.long() - 1)[:, None]                                                     # [Bd, 1]
    Hg = sink.shape[0]
    sink_blocks = (-(-sink.long() // bs))[None, :]                                         # [1, Hg]
    last = q // bs                                                                         # [Bd, 1]
    first = torch.maximum((q - span + 1).clamp(min=0) // bs, sink_blocks)                  # [Bd, Hg]
    n_sink = torch.minimum(last + 1, sink_blocks)                                          # sink blocks that exist
    count = n_sink + (last - first + 1).clamp(min=0)                                       # [Bd, Hg]
    K = int(count.max()) if count.numel() else 0
    j = torch.arange(K, device=device)[None, None, :]
    n_sink, first, count = n_sink[..., None], first[..., None], count[..., None]
    logical = torch.where(j < n_sink, j, first + j - n_sink)                               # [Bd, Hg, K]
    valid = j < count
    rows = block_table.long()[:, None, :].expand(-1, Hg, -1)
    physical = rows.gather(2, torch.where(valid, logical, 0))                              # [Bd, Hg, K]
    head_ids = torch.arange(Hg, device=device) if heads is None else torch.tensor(heads, device=device)
    ids = physical * (Hg if num_kv_heads is None else num_kv_heads) + head_ids[None, :, None]
    return torch.where(valid, ids, -1).to(torch.int32)


def query_heads(heads: list[int], group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Query heads reading the KV ``heads`` (query head ``i`` reads KV head ``i // group_size``)."""
    return (torch.tensor(heads, device=device)[:, None] * group_size
            + torch.arange(group_size, device=device)).reshape(-1)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
           output: torch.Tensor, step: StepLayout, rule: LayerRule, scale: float, backend: str = "auto",
           prefill_rule: LayerRule | None = None, dense_kernel=None) -> None:
    """A plan layer's attention for one vLLM step, written into ``output``.

    Args:
        query: ``[T, H, D]``; key, value: ``[T, Hkv, D]`` this step's new tokens (already in
            ``kv_cache``).
        kv_cache: ``[P, Hkv, bs, 2*D]`` the layer's cache (written by ``write``).
        output: ``[T, H, D]`` written for every real token.
        step: the step's ``StepLayout``; rule: the layer's sink/span rule; scale: softmax scale.
        prefill_rule: the rule of prefill tokens (``rule.as_dense()`` for a plan that prefills dense:
            the cache holds every key, so they read everything); default ``rule``.
        backend: kernel backend for ``paged_decode`` / ``sink_window_attention``.
        dense_kernel: when every head prefills dense, ``dense_kernel(query, key, value, kv_cache, output,
            step, scale)`` runs the step's prefill sequences and returns those it left (``cpu_prefill``:
            vLLM's own kernel); default: ``dense_prefill`` per sequence.

    Decode tokens go through one ``paged_decode_logical`` call per layer over vLLM's block table (the native
    kernel visits only each head's sink and window entries; no per-head tables or positions are built), or,
    where the native kernel does not run, through ``paged_decode`` over per-head tables (``DecodeCall``).
    Prefill sequences read densely go through ``dense_kernel`` or ``dense_prefill`` (torch's CPU flash
    attention); the others through ``sink_window_attention``: over their own new keys when they have no
    context (fresh prompt), else over their cached blocks.
    """
    Hkv = key.shape[1]
    k_pool, v_pool = pools(kv_cache)
    if step.decode_rows.numel():
        tokens = step.decode_tokens
        q_all = query[tokens]                                                               # [Bd, H, D]
        k_slots, v_slots = slot_pools(kv_cache)
        if backend in ("auto", "native") and native.supports(q_all, k_slots):
            # vLLM's table is in position order: the kernel finds each head's sink and window entries itself
            _, q_pos, spans = decode_spans(step, rule)
            table = step.cache("decode_table32", lambda: step.raw_table[step.decode_rows].to(torch.int32).contiguous())
            out = paged_decode_logical(q_all, k_slots, v_slots, table, q_pos, rule.sink, spans, scale, NULL_BLOCK,
                                       backend="native")
            output[tokens] = out.to(output.dtype)
        else:
            # the native kernel reads blocks of up to native.MAX_BLOCK slots; larger ones take the torch path
            decode_backend = "cpu" if backend == "auto" and step.block_size > native.MAX_BLOCK else backend
            pos_pool = step.pos_pool(k_pool.shape[0])
            call = step.cache(("decode", rule_key(rule)), lambda: DecodeCall.build(step, rule))
            # Sequences in chunks whose gathered pages stay in cache while the kernel reads them again.
            per_row = 2 * call.tables.shape[1] * call.tables.shape[2] * step.block_size * query.shape[2] * 4
            n = call.tables.shape[0]
            rows_per_call = max(1, DECODE_GATHER_BYTES // per_row) if DECODE_GATHER_BYTES else n
            for a in range(0, n, rows_per_call):
                c = slice(a, a + rows_per_call)
                out = paged_decode(q_all[c], k_pool, v_pool, pos_pool, call.tables[c], call.q_pos[c], call.sink,
                                   call.spans[c], scale, backend=decode_backend)
                output[tokens[c]] = out.to(output.dtype)
    prefill_rule = rule if prefill_rule is None else prefill_rule
    all_dense = prefill_rule.all_dense
    prefills = step.prefills
    if all_dense and dense_kernel is not None and prefills:
        prefills = dense_kernel(query, key, value, kv_cache, output, step, scale)
    for p in prefills:
        if all_dense and dense_prefill(query, key, value, kv_cache, output, step, p, scale):
            continue
        q = query[p.start:p.end].transpose(0, 1)[None]                                      # [1, H, Q, D]
        q_pos = torch.arange(p.context, p.length)[None]                                      # [1, Q]
        if p.context == 0:
            k = key[p.start:p.end].transpose(0, 1)[None]                                    # [1, Hkv, Q, D]
            v = value[p.start:p.end].transpose(0, 1)[None]
            k_pos = q_pos[:, None]                                                           # [1, 1, Q]
        else:
            n_blocks = -(-p.length // step.block_size)
            phys = step.block_table[p.row, :n_blocks].long()
            tables = (phys[None, :] * Hkv + torch.arange(Hkv)[:, None])[None]               # [1, Hkv, n]
            k, v, k_pos = gather_pages(k_pool, v_pool, step.pos_pool(k_pool.shape[0]), tables)
            k, v, k_pos = k[:, :, :p.length], v[:, :, :p.length], k_pos[:, :1, :p.length]
        span = prefill_rule.span(torch.tensor([p.length]))                                   # [1, Hkv]
        out = sink_window_attention(q, k, v, q_pos, k_pos, prefill_rule.sink, span, scale, backend=backend)
        output[p.start:p.end] = out[0].transpose(0, 1).to(output.dtype)


def dense_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  output: torch.Tensor, step: StepLayout, p: Prefill, scale: float) -> bool:
    """One prefill sequence read densely (every earlier key and its own, causally), written into ``output``.

    The chunk's own keys come from ``key`` / ``value``; its context (``p.context`` earlier tokens) is
    copied out of its cache blocks in order (``context_kv``). Returns ``False``, writing nothing, when a
    context entry of its block table is ``NULL_BLOCK`` (a recomputed chunk past its prompt whose
    earlier blocks were given back): the caller's general path reads only what is held.

    Shapes as ``attend``; ``p`` is one of ``step.prefills``.
    """
    context_k = context_v = None
    if p.context:
        kv = context_kv(kv_cache, step.block_table[p.row], p.context)
        if kv is None:
            return False
        context_k, context_v = kv
    out = causal_attention(query[p.start:p.end], key[p.start:p.end], value[p.start:p.end], context_k, context_v,
                           scale)
    output[p.start:p.end] = out.to(output.dtype)
    return True


def context_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, context: int):
    """The first ``context`` keys and values of one sequence in position order, or ``None`` if one of
    their blocks is ``NULL_BLOCK``.

    Args:
        kv_cache: ``[P, Hkv, bs, 2*D]`` (written by ``write``); block_row: ``[M]`` the sequence's vLLM blocks.

    Returns:
        ``(k, v)``, each ``[Hkv, context, D]`` (one copy of the blocks, then views).
    """
    bs = kv_cache.shape[2]
    phys = block_row[:-(-context // bs)].long()
    if bool((phys == NULL_BLOCK).any()):
        return None
    c = cells(kv_cache).index_select(0, phys)                                    # [n, Hkv, 2, bs, D]
    n, Hkv, _, _, D = c.shape
    kv = c.permute(2, 1, 0, 3, 4).reshape(2, Hkv, n * bs, D)[:, :, :context]    # [2, Hkv, context, D]
    return kv[0], kv[1]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_k: torch.Tensor | None,
                     context_v: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Dense causal attention of a chunk of ``Q`` new tokens after ``C`` earlier ones (bottom-right aligned).

    Query ``i`` reads every earlier key and the chunk's keys ``0..i``. Two mask-free pieces of torch's CPU
    flash attention, merged exactly by their log-sum-exp: the context (no mask; the ``G`` query heads of
    a KV head folded into the query axis, so keys are not repeated) and the chunk itself (causal, keys
    repeated over the ``G`` query heads). Math in the inputs' dtype with fp32 accumulation (torch's
    kernel), the merge in fp32.

    Args:
        q: ``[Q, H, D]``; k, v: ``[Q, Hkv, D]`` the chunk's (query head ``i`` reads KV head ``i // (H // Hkv)``).
        context_k, context_v: ``[Hkv, C, D]`` the earlier keys and values, or ``None`` (``C = 0``).
        scale: softmax scale.

    Returns:
        ``[Q, H, D]`` in ``q``'s dtype.
    """
    Q, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    dtype = q.dtype
    qh = q.transpose(0, 1)                                                          # [H, Q, D] view
    kh = k.to(dtype).transpose(0, 1)                                                # [Hkv, Q, D]
    vh = v.to(dtype).transpose(0, 1)
    if G > 1:
        kh = kh[:, None].expand(Hkv, G, Q, D).reshape(H, Q, D)
        vh = vh[:, None].expand(Hkv, G, Q, D).reshape(H, Q, D)
    own, own_lse = _flash(qh[None], kh[None], vh[None], True, scale)                # [1, H, Q, D], [1, H, Q]
    if context_k is None or context_k.shape[1] == 0:
        return own[0].transpose(0, 1)
    qg = qh.reshape(Hkv, G * Q, D)[None]                                            # [1, Hkv, G*Q, D]
    past, past_lse = _flash(qg, context_k.to(dtype)[None], context_v.to(dtype)[None], False, scale)
    past, past_lse = past.reshape(H, Q, D), past_lse.reshape(H, Q)
    own, own_lse = own[0], own_lse[0]
    top = torch.maximum(own_lse, past_lse)
    w_own, w_past = (own_lse - top).exp(), (past_lse - top).exp()                    # [H, Q] fp32
    total = w_own + w_past
    out = own.float() * (w_own / total)[..., None] + past.float() * (w_past / total)[..., None]
    return out.to(dtype).transpose(0, 1)


def _flash(q, k, v, causal: bool, scale: float):
    """torch's CPU flash attention ``(out [B, H, Q, D], logsumexp [B, H, Q] fp32)``."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
