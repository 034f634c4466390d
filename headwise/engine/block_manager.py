"""Block manager: one free list over the preallocated pool, whole blocks per (sequence, layer, KV head).

A window head's table never grows past ``engine.layout.HeadLayout.max_blocks`` (sink blocks + a ring of window
blocks it overwrites as it decodes); a dense head's grows with the sequence. Blocks are taken
only when a step needs them and all of a sequence's blocks come back when it finishes or is
preempted.
"""

from __future__ import annotations

import torch

from .sequence import Sequence


def pool_size(kv_cache_memory: int, block_size: int, head_dim: int, element: int) -> tuple[int, int]:
    """``(blocks, bytes of one block's K and V)`` a pool of ``kv_cache_memory`` bytes holds: a block is
    ``block_size`` tokens of one KV head, plus 8 bytes of slot position per token."""
    block_bytes = block_size * head_dim * 2 * element
    return kv_cache_memory // (block_bytes + block_size * 8), block_bytes


class BlockManager:
    """Free list over ``num_blocks`` pool blocks; tables live on the sequences."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.fresh: list[int] = []          # blocks handed out since the runner last cleared their slots

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def _new_blocks(self, seq: Sequence, last_position: int) -> torch.Tensor:
        return (seq.blocks_needed_upto(last_position, self.block_size) - seq.nblocks).clamp(min=0)

    def blocks_to_store(self, seq: Sequence, last_position: int) -> int:
        """Blocks ``seq`` must still take to hold every position up to ``last_position``."""
        return int(self._new_blocks(seq, last_position).sum())

    def lifetime_blocks(self, seq: Sequence) -> int:
        """Blocks ``seq`` holds at most, at its target length."""
        return int(seq.max_blocks.sum())

    def allocate(self, seq: Sequence, last_position: int) -> None:
        """Give ``seq`` the blocks it needs to store positions up to ``last_position``."""
        new = self._new_blocks(seq, last_position)
        total = int(new.sum())
        if total == 0:
            return
        if total > len(self.free):
            raise RuntimeError(f"block manager: {total} blocks asked with {len(self.free)} free; "
                               "the scheduler must check blocks_to_store first.")
        taken = self.free[-total:]
        del self.free[-total:]
        self.fresh.extend(taken)
        slots = torch.arange(seq.table.shape[-1])
        where = (slots >= seq.nblocks[..., None]) & (slots < (seq.nblocks + new)[..., None])   # [L, H, M]
        seq.table[where] = torch.tensor(taken, dtype=torch.int32)
        seq.nblocks += new
        seq.note_blocks()

    def release(self, seq: Sequence) -> None:
        """Return every block of ``seq`` to the free list."""
        held = seq.table[seq.table >= 0].tolist()
        self.free.extend(held)
        seq.table.fill_(-1)
        seq.nblocks.zero_()

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh
