"""Scheduling under pool pressure: no leaked or shared blocks, preemption keeps tokens, load test."""

from __future__ import annotations

import random

import pytest

from headwise.engine import LLM
from headwise.engine.block_manager import BlockManager
from headwise.engine.sampling import SamplingParams
from headwise.engine.sequence import Sequence
from tests.engine.conftest import greedy, make_long_tiny, random_prompts
from tests.engine.test_engine import mixed_plan


class CheckedBlockManager(BlockManager):
    """Asserts after every change that no block is lost, doubled or shared between heads."""

    def __init__(self, *args, owners=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.live: list[Sequence] = []
        self.peak = 0

    def check(self):
        held = [b for seq in self.live for b in seq.table[seq.table >= 0].tolist()]
        assert len(held) == len(set(held)), "a block is held twice"
        assert not set(held) & set(self.free), "a held block is also free"
        assert len(held) + len(self.free) == self.num_blocks, "blocks leaked"
        assert len(set(self.free)) == len(self.free)
        self.peak = max(self.peak, len(held))

    def allocate(self, seq, last_position):
        if seq not in self.live:
            self.live.append(seq)
        super().allocate(seq, last_position)
        assert (seq.nblocks <= seq.max_blocks).all()
        self.check()

    def release(self, seq):
        super().release(seq)
        if seq in self.live:
            self.live.remove(seq)
        self.check()


def checked_llm(model, plan, memory, **kwargs) -> LLM:
    llm = LLM(model, plan=plan, kv_cache_memory=memory, **kwargs)
    checked = CheckedBlockManager(llm.blocks.num_blocks, llm.blocks.block_size)
    llm.blocks = llm.scheduler.blocks = checked
    return llm


def solo(model, plan, prompt, max_tokens, block_size=8):
    llm = LLM(model, plan=plan, kv_cache_memory="64MiB", block_size=block_size)
    return llm.generate([{"prompt_token_ids": prompt}], greedy(max_tokens), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("seed", range(6))
def test_random_request_mixes_never_leak(llama, seed):
    """Property over random mixes: every request ends, the pool is whole again, no block is shared."""
    rng = random.Random(seed)
    plan = rng.choice(["dense", "uniform:0.25:4", mixed_plan(llama)])
    n = rng.randint(1, 12)
    prompts = random_prompts([rng.randint(1, 300) for _ in range(n)], seed=seed)
    params = [SamplingParams(max_tokens=rng.randint(1, 40), temperature=rng.choice([0.0, 0.8]), seed=rng.randint(0, 9),
                             ignore_eos=rng.random() < 0.7) for _ in range(n)]
    llm = checked_llm(llama, plan, rng.choice(["160KiB", "400KiB", "4MiB"]), block_size=rng.choice([4, 8, 16]),
                      max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=rng.choice([16, 64, 512]))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, p in zip(outs, params):
        assert out.error or out.finished and 1 <= len(out.outputs[0].token_ids) <= p.max_tokens
    assert llm.blocks.num_free == llm.blocks.num_blocks and not llm.blocks.live
    assert not llm.scheduler.running and not llm.scheduler.waiting


def test_preemption_gives_the_tokens_of_an_unpressured_run(llama):
    plan = mixed_plan(llama)
    prompts = random_prompts((120, 200, 60, 250, 90, 180), seed=11)
    batch = [{"prompt_token_ids": p} for p in prompts]
    roomy = LLM(llama, plan=plan, kv_cache_memory="64MiB", block_size=8)
    expected = [o.outputs[0].token_ids for o in roomy.generate(batch, greedy(60), use_tqdm=False)]
    tight = checked_llm(llama, plan, "300KiB", block_size=8, max_num_batched_tokens=64)
    outs = tight.generate(batch, greedy(60), use_tqdm=False)
    assert tight.last_stats.preemptions > 0, "the pool was meant to force preemptions"
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.blocks.num_free == tight.blocks.num_blocks


@pytest.mark.slow
def test_load_64_mixed_requests_on_a_small_pool():
    """64 requests (prompt 1-2000 tokens, max_tokens 1-200) on a pool that holds under a quarter of them."""
    model = make_long_tiny(seed=3)
    rng = random.Random(0)
    prompts = random_prompts([rng.randint(1, 2000) for _ in range(64)], seed=12)
    max_tokens = [rng.randint(1, 200) for _ in range(64)]
    plan = mixed_plan(model)
    probe = LLM(model, plan=plan, kv_cache_memory="1MiB", block_size=16)
    lifetimes = sorted(probe.blocks.lifetime_blocks(Sequence(p, greedy(m), probe.plan, 16, probe.max_length))
                       for p, m in zip(prompts, max_tokens))
    pool_blocks = sum(lifetimes[:16]) // 2                # the 16 smallest requests do not fit at once
    assert pool_blocks >= lifetimes[-1], "every request must fit the pool alone"
    memory = pool_blocks * (probe.block_bytes + 16 * 8)
    llm = checked_llm(model, plan, memory, block_size=16, max_num_seqs=32, max_num_batched_tokens=512)
    assert llm.blocks.num_blocks == pool_blocks
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in max_tokens], use_tqdm=False)
    assert all(o.error is None and o.finished for o in outs)
    assert llm.blocks.peak <= pool_blocks and llm.blocks.num_free == pool_blocks
    for out, p, m in zip(outs, prompts, max_tokens):
        assert out.outputs[0].token_ids == solo(model, plan, p, m, block_size=16)
    print(f"load test: preemptions {llm.last_stats.preemptions}, steps {llm.last_stats.steps}")
