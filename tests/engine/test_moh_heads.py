"""Mixture-of-Head (``moh``) heads in the engine: same tokens as the patched HF model; routed-out KV heads unread."""

from __future__ import annotations

import dataclasses

import pytest

from headwise.engine import LLM
from tests.conftest import make_tiny
from tests.engine.conftest import (assert_engine_equals_patched_hf, assert_preemption_keeps_the_tokens, greedy,
                                   hf_greedy, random_prompts)
from tests.kinds.test_moh import all_moh_plan, moh_plan

LENGTHS = (1, 6, 45, 170)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("step_tokens", [512, 32], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_moh_plan_equals_patched_hf(arch, step_tokens):
    """Layer 0 all moh (top 2 of 6 query heads), layer 1 window + moh with a window rule (top 1 of 3)."""
    model = make_tiny(arch)
    _, outs = assert_engine_equals_patched_hf(model, moh_plan(model), random_prompts(LENGTHS, seed=3), 10,
                                              max_num_batched_tokens=step_tokens)
    for out in outs:
        assert out.kv["peak_bytes_by_kind"]["moh"] > 0          # moh heads keep KV blocks (every token is written)


def test_router_selecting_every_head_equals_the_dense_plan():
    model = make_tiny("llama")
    prompts = random_prompts((5, 60, 130), seed=4)
    dense = LLM(model, plan="dense", kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    routed_all = LLM(model, plan=all_moh_plan(model, top_k=6), kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in routed_all] == [o.outputs[0].token_ids for o in dense]


def test_decode_reads_only_kv_heads_with_a_selected_query_head(monkeypatch):
    """Every paged_decode call of a routed group gets exactly the sequences whose routing selects a
    query head of that KV head, and the step's routing runs top_k heads per sequence."""
    from headwise.kinds.moh import engine as moh_engine

    model = make_tiny("llama")
    plan = all_moh_plan(model, top_k=2)
    calls = []
    real = moh_engine.paged_decode

    def spy(q, k_pool, v_pool, pos_pool, tables, q_pos, *args, **kwargs):
        calls.append((q.shape[0], tables.shape[1]))
        return real(q, k_pool, v_pool, pos_pool, tables, q_pos, *args, **kwargs)

    monkeypatch.setattr(moh_engine, "paged_decode", spy)
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8)
    prompts = random_prompts((30, 40, 50, 60), seed=7)
    seen = []
    groups = [g for layer in llm.runner.groups for g, _ in layer]
    original = moh_engine.MoHEngineGroup.decode

    def decode(self, step, heads, q, k, v):
        calls.clear()
        out = original(self, step, heads, q, k, v)
        active = self.group.route(q[:, :, None], step.decode_pos[:, None])[..., 0]    # [Bd, 6], as decode routes
        expected = [int(active[:, j * 3:(j + 1) * 3].any(1).sum()) for j in range(2)]
        seen.append(([r for r, _ in calls], [n for n in expected if n]))
        assert bool((active.sum(1) == 2).all())
        return out

    monkeypatch.setattr(moh_engine.MoHEngineGroup, "decode", decode)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(6), use_tqdm=False)
    assert all(isinstance(g, moh_engine.MoHEngineGroup) for g in groups)
    assert seen and all(rows == expected for rows, expected in seen)
    # with 2 of 6 query heads per sequence, some steps leave a KV head unread for some sequence
    assert any(sum(rows) < 2 * 4 for rows, _ in seen)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 6, plan=plan)


def test_dense_prefill_with_moh_heads_equals_patched_hf():
    model = make_tiny("llama")
    plan = dataclasses.replace(moh_plan(model), prefill="dense")
    assert_engine_equals_patched_hf(model, plan, random_prompts((7, 90), seed=6), 8)


def test_moh_heads_survive_preemption():
    model = make_tiny("llama")
    assert_preemption_keeps_the_tokens(model, moh_plan(model))


@pytest.mark.slow
def test_shipped_moh_plan_on_the_real_model_equals_patched_hf(real_model):
    """shipped plan ``smollm2-135m-moh0.75`` (fitted routers, 22 routed layers): engine greedy tokens equal
    the patched HF model's on a batch of two prose prompts."""

    from headwise import load_plan
    from headwise.data.prose import tokenized_prose

    model, tokenizer = real_model
    plan = load_plan("smollm2-135m-moh0.75", model)
    prose = tokenized_prose(tokenizer)
    prompts = [tokenizer(prose.slice(start, n), add_special_tokens=False).input_ids
               for start, n in ((2000, 200), (9000, 80))]
    llm = LLM(model, plan=plan, kv_cache_memory="256MiB")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 8, plan=plan)
