"""Hybrid heads (sink + window KV blocks and a recurrent state) in the engine: same tokens as the
patched HF model, with whole and chunked prefill, under preemption, with dense prefill."""

from __future__ import annotations

import dataclasses

import pytest

from headwise.engine import LLM
from tests.conftest import make_tiny
from tests.engine.conftest import (assert_engine_equals_patched_hf, assert_preemption_keeps_the_tokens, greedy,
                                   random_prompts)
from tests.kinds.test_hybrid import all_hybrid_plan, hybrid_plan

LENGTHS = (1, 6, 45, 170)


@pytest.mark.parametrize("plan_of", [hybrid_plan, all_hybrid_plan], ids=["mixed", "all-hybrid"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("step_tokens", [512, 32], ids=["whole-prompts", "chunked-prefill"])
def test_hybrid_plan_equals_patched_hf(arch, step_tokens, plan_of):
    model = make_tiny(arch)
    _, outs = assert_engine_equals_patched_hf(model, plan_of(model), random_prompts(LENGTHS, seed=3), 12,
                                              max_num_batched_tokens=step_tokens)
    for out in outs:
        assert out.kv["state_bytes"] > 0
        assert out.kv["peak_bytes_by_kind"]["hybrid"] > 0              # sink + window ring in KV blocks


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
    assert_preemption_keeps_the_tokens(model, hybrid_plan(model))


def test_dense_prefill_with_hybrid_heads_equals_patched_hf():
    model = make_tiny("llama")
    plan = dataclasses.replace(hybrid_plan(model), prefill="dense")
    assert_engine_equals_patched_hf(model, plan, random_prompts((7, 90), seed=6), 8)
