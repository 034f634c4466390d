"""Continuous batching: decode tokens first, then prefill chunks, admitting requests whose blocks fit.

Each step has a token budget (``max_num_batched_tokens``). Running sequences that decode get one
token each, oldest first; when one needs a block and none is free the newest running sequence is
preempted (its blocks freed, its tokens recomputed later), never the pool exceeded. What is left
of the budget goes to prefill chunks: running sequences part-way through their prompt, then
waiting requests in arrival order while their first chunk's blocks fit and ``max_num_seqs``
allows. Plans with dense prefill never split a prompt (a chunk after the first would read KV the
window heads already dropped): its prefill is one chunk, over the budget when it runs alone.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, whole_prefill: bool = False):
        self.config = config
        self.whole_prefill = whole_prefill      # dense-prefill plans: a prompt's prefill is one chunk
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.blocks.release(seq)
        self.running.remove(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first; its tokens are recomputed when it runs again."""
        self.blocks.release(seq)
        self.running.remove(seq)
        seq.status = Status.WAITING
        seq.num_computed = 0
        seq.states.clear()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _take(self, seq: Sequence, n: int) -> bool:
        """Allocate blocks for ``seq``'s next ``n`` tokens if they fit."""
        last = seq.num_computed + n - 1
        if self.blocks.blocks_to_store(seq, last) > self.blocks.num_free:
            return False
        self.blocks.allocate(seq, last)
        return True

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's ``(sequence, new tokens)``: decodes first, then prefill chunks."""
        while True:
            batch = self._schedule_once()
            if batch or not self.running:
                return batch
            self.preempt(self.running[-1])           # running prefills starve each other: make room

    def _schedule_once(self) -> list[tuple[Sequence, int]]:
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or not seq.is_decoding or budget == 0:
                continue
            while not self._take(seq, 1):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if budget == 0:
                break
            if not seq.is_decoding and all(s is not seq for s, _ in batch):
                n = self._chunk(seq, budget, batch)
                if n and self._take(seq, n):
                    batch.append((seq, n))
                    budget -= min(n, budget)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = self._chunk(seq, budget, batch)
            if not n or not self._take(seq, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= min(n, budget)
        return batch

    def _chunk(self, seq: Sequence, budget: int, batch) -> int:
        """Prefill tokens ``seq`` runs this step (0: not this step).

        Chunked: up to the budget. Whole-prefill: all its uncomputed tokens, past the budget only
        when no other prefill is in the step.
        """
        if not self.whole_prefill:
            return min(seq.uncomputed, budget)
        if seq.uncomputed <= budget or not any(not s.is_decoding for s, _ in batch):
            return seq.uncomputed
        return 0
