"""Hybrid heads (sink + window KV blocks and a recurrent state) in the engine: same tokens as the
patched HF model, with whole and chunked prefill, under preemption, with dense prefill."""

from __future__ import annotations

import dataclasses

import pytest

from headwise.engine import LLM
from tests.conftest import make_tiny
from tests.engine.conftest import greedy, hf_greedy, random_prompts
from tests.kinds.test_hybrid import all_hybrid_plan, hybrid_plan

LENGTHS = (1, 6, 45, 170)


@pytest.mark.parametrize("plan_of", [hybrid_plan, all_hybrid_plan], ids=["mixed", "all-hybrid"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("step_tokens", [512, 32], ids=["whole-prompts", "chunked-prefill"])
def test_hybrid_plan_equals_patched_hf(arch, step_tokens, plan_of):
    model = make_tiny(arch)
    plan = plan_of(model)
    prompts = random_prompts(LENGTHS, seed=3)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=step_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 12, plan=plan), f"prompt of {len(p)} tokens"
        assert out.kv["state_bytes"] > 0
        assert out.kv["peak_bytes_by_kind"]["hybrid"] > 0              # sink + window ring in KV blocks
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_hybrid_heads_hold_a_ring_not_the_whole_sequence():
    """A 170-token request: a hybrid head of sink 3 + window 9 holds 2 blocks of 8 (13 slots), not 22."""
    model = make_tiny("llama")
    plan = all_hybrid_plan(model)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8)
    out = llm.generate([{"prompt_token_ids": random_prompts((170,), seed=4)[0]}], greedy(4), use_tqdm=False)[0]
    # per layer: head 0 (sink 1 + ring 8 -> 1 + 1 blocks), head 1 (sink 3 + ring 16 -> 1 + 2 blocks)
    per_block = out.kv["peak_bytes_by_kind"]["hybrid"] // (2 * (2 + 3))
    assert out.kv["peak_bytes_by_kind"]["hybrid"] == 2 * (2 + 3) * per_block


def test_hybrid_state_survives_preemption():
    """The dense head of the mixed plan grows until requests are preempted and recomputed."""
    model = make_tiny("llama")
    plan = hybrid_plan(model)
    prompts = random_prompts((150, 160, 170, 140), seed=5)
    params = greedy(40)
    solo = [LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    tight = LLM(model, plan=plan, kv_cache_memory="96KiB", block_size=8)
    outs = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.last_stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == solo


def test_dense_prefill_with_hybrid_heads_equals_patched_hf():
    model = make_tiny("llama")
    plan = dataclasses.replace(hybrid_plan(model), prefill="dense")
    prompts = random_prompts((7, 90), seed=6)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 8, plan=plan)
