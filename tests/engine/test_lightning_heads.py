"""Lightning heads (a recurrent state, no KV) in the engine: same tokens as the patched HF model."""

from __future__ import annotations

import dataclasses

import pytest

from headwise.engine import LLM
from tests.conftest import make_tiny
from tests.engine.conftest import greedy, hf_greedy, random_prompts
from tests.kinds.test_lightning import lightning_plan

LENGTHS = (1, 6, 45, 170)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("step_tokens", [512, 32], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_lightning_plan_equals_patched_hf(arch, step_tokens):
    model = make_tiny(arch)
    plan = lightning_plan(model)
    prompts = random_prompts(LENGTHS, seed=3)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=step_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(10), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 10, plan=plan), f"prompt of {len(p)} tokens"
        assert out.kv["state_bytes"] > 0
        assert out.kv["peak_bytes_by_kind"]["lightning"] == 0          # no KV blocks for lightning heads
    assert llm.blocks.num_free == llm.blocks.num_blocks
    assert llm.last_stats.peak_state_bytes > 0


def test_lightning_state_survives_preemption():
    model = make_tiny("llama")
    plan = lightning_plan(model)
    prompts = random_prompts((150, 160, 170, 140), seed=5)
    params = greedy(40)
    solo = [LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    tight = LLM(model, plan=plan, kv_cache_memory="96KiB", block_size=8)
    outs = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.last_stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == solo


def test_dense_prefill_with_lightning_heads_equals_patched_hf():
    model = make_tiny("llama")
    plan = dataclasses.replace(lightning_plan(model), prefill="dense")
    prompts = random_prompts((7, 90), seed=6)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 8, plan=plan)
