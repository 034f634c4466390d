"""Reference paged decode: gather each sequence's pages into a dense cache, run the sink_window reference.

The contract every ``paged_decode`` backend implements (docs/design.md, "Kernels"): one query per sequence
over a paged KV pool, each KV head reading its sink + its own window.

Layout (one pool per layer; a block holds ``block_size`` consecutive slots of ``Hb`` KV heads):

* ``k_pool``, ``v_pool``: ``[P, block_size, Hb, D]`` float (``P`` blocks).
* ``pos_pool``: ``[P, block_size]`` int64, the real position of the token in each slot, -1 when
  the slot is empty. Positions are explicit because window heads reuse their slots as a ring, so a
  slot's position cannot be read off its index.
* ``block_tables``: ``[B, Ht, M]`` int32 (or int64), the blocks of each sequence and *head group*,
  -1 for unused entries. ``Hkv = Ht * Hb``: KV head ``h`` reads table row ``h // Hb`` and in-block
  head ``h % Hb``. ``Hb = 1`` gives every KV head its own table (window heads hold only
  ``ceil((sink + span) / block_size)`` blocks, dense heads grow); ``Hb = Hkv`` is vLLM's one table
  per sequence. Slot order inside a table is free.

Why this layout: the plan's unit is the KV head, so pages are per head (group) and a head that
keeps 25% of the tokens holds 25% of the blocks; ``D`` contiguous per slot keeps every key a single
vector load; one ``pos_pool`` entry per slot costs 8 bytes against ``2 * Hb * D * 2`` bytes of KV.
"""

from __future__ import annotations

import torch

from ..sink_window import naive as sink_window_naive


def gather_pages(k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor, block_tables: torch.Tensor):
    """Each sequence's pages as a dense cache.

    Args:
        k_pool, v_pool: ``[P, block_size, Hb, D]``; pos_pool: ``[P, block_size]`` int64;
        block_tables: ``[B, Ht, M]`` int, -1 for unused entries.

    Returns:
        ``(k, v, k_pos)``: ``[B, Hkv, M * block_size, D]`` twice and ``[B, Hkv, M * block_size]``
        int64 (-1 for slots of unused entries), ``Hkv = Ht * Hb``.
    """
    P, bs, Hb, D = k_pool.shape
    B, Ht, M = block_tables.shape
    used = block_tables >= 0                                                    # [B, Ht, M]
    blocks = block_tables.long().clamp(min=0)

    def dense(pool: torch.Tensor) -> torch.Tensor:                               # -> [B, Hkv, M*bs, D]
        return pool[blocks].permute(0, 1, 4, 2, 3, 5).reshape(B, Ht * Hb, M * bs, D)

    k_pos = pos_pool[blocks].masked_fill(~used[..., None], -1).reshape(B, Ht, M * bs)
    return dense(k_pool), dense(v_pool), k_pos.repeat_interleave(Hb, dim=1)


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor,
                 block_tables: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """One decode step of sink + window attention over a paged KV pool.

    Args:
        q: ``[B, H, D]`` the new token's queries (``H`` a multiple of ``Hkv``).
        k_pool, v_pool, pos_pool, block_tables: see the module docstring.
        q_pos: ``[B]`` int64 position of each sequence's new token (its length - 1), -1 for an
            idle batch row.
        sink: ``[Hkv]`` int64; span: ``[B, Hkv]`` int64 (visibility as ``sink_window.naive.visible``).
        scale: softmax scale.

    Returns:
        ``[B, H, D]`` in ``q.dtype``; rows that see no key get zeros.
    """
    k, v, k_pos = gather_pages(k_pool, v_pool, pos_pool, block_tables)
    out = sink_window_naive.sink_window_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale)
    return out[:, :, 0]


def paged_decode_logical(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                         q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                         null_block: int = -1) -> torch.Tensor:
    """``paged_decode`` over a table in position order, where positions are implied instead of stored.

    Args:
        q: ``[B, H, D]``; k_pool, v_pool: ``[P, block_size, Hkv, D]`` (every KV head in each block: vLLM's
            layout, as a strided view).
        block_table: ``[B, M]`` int, each sequence's blocks in position order: slot ``t`` of entry ``j``
            holds position ``j * block_size + t``; entries ``< 0`` or equal to ``null_block`` hold nothing.
        q_pos, sink, span, scale: as ``paged_decode`` (``sink [Hkv]``, ``span [B, Hkv]``).

    Returns:
        ``[B, H, D]`` in ``q.dtype``: what ``paged_decode`` gives with those positions written out.
    """
    P, bs, Hkv, D = k_pool.shape
    B, M = block_table.shape
    used = (block_table >= 0) & (block_table != null_block)                                # [B, M]
    blocks = block_table.long().clamp(min=0).reshape(-1)                                  # [B * M]
    positions = torch.arange(M * bs, device=q.device).reshape(1, M, bs)
    pos_pool = torch.where(used[..., None], positions, -1).reshape(B * M, bs)             # one block per entry
    tables = torch.arange(B * M, device=q.device, dtype=torch.int32).reshape(B, 1, M)
    return paged_decode(q, k_pool[blocks], v_pool[blocks], pos_pool, tables, q_pos, sink, span, scale)
