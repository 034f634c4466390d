"""Softplus heads (LSSA / LSSAR over a normal KV cache) in the engine: same tokens as the patched HF model."""

from __future__ import annotations

import pytest

from headwise.engine import LLM
from headwise.engine.kinds import SOFTMAX_KV, engine_kind
from headwise.kinds.softplus import Softplus
from headwise.plan import Dense, Window
from tests.conftest import make_tiny
from tests.engine.conftest import greedy, hf_greedy, random_prompts
from tests.kinds.test_lightning import lightning_plan
from tests.kinds.test_softplus import EXP_WINDOW, LSSA, LSSAR, SOFTMAX, plan_of

LENGTHS = (1, 6, 45, 170)


def mixed_plan(model):
    """softplus (dense span, re-weighted) + window in layer 0; windowed exp re-weighting + dense in layer 1."""
    return plan_of(model, [(LSSAR, Window(sink=2, alpha=20.0)), (EXP_WINDOW, Dense())])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("step_tokens", [512, 32], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_softplus_plan_equals_patched_hf(arch, step_tokens):
    model = make_tiny(arch)
    plan = mixed_plan(model)
    prompts = random_prompts(LENGTHS, seed=3)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=step_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(10), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 10, plan=plan), f"prompt of {len(p)} tokens"
        assert out.kv["peak_bytes_by_kind"]["softplus"] > 0
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_softplus_with_lightning_and_an_elastic_window_equals_patched_hf():
    """All four kinds in one plan; the LSSA head's span grows with each request's own length."""
    model = make_tiny("llama")
    base = lightning_plan(model)                  # layer 0: lightning + dense; layer 1: window + lightning
    plan = plan_of(model, [(base.layers[0][0], LSSA), (base.layers[1][0], LSSAR)], base.weights)
    prompts = random_prompts((7, 90, 150), seed=4)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 12, plan=plan)


def test_softplus_heads_survive_preemption():
    model = make_tiny("llama")
    plan = mixed_plan(model)
    prompts = random_prompts((150, 160, 170, 140), seed=5)
    params = greedy(30)
    solo = [LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    tight = LLM(model, plan=plan, kv_cache_memory="104KiB", block_size=8)
    outs = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.last_stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == solo


def test_plain_softmax_softplus_heads_run_as_softmax_kv():
    model = make_tiny("llama")
    assert engine_kind(SOFTMAX).bind(0, [0, 1], [SOFTMAX, SOFTMAX], {}) is SOFTMAX_KV
    plan = plan_of(model, [(SOFTMAX, Softplus(nonlinearity="exp", scale="none", sink=2, alpha=9.0, beta=0.0))] * 2)
    prompts = random_prompts((30, 120), seed=6)
    outs = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 8, plan=plan)
