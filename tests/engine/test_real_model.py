"""The engine on the embedded SmolLM2: same greedy tokens as the patched HF model, batched, mixed lengths."""

from __future__ import annotations

import pytest

from headwise.engine import LLM
from tests.engine.conftest import greedy, hf_greedy

from headwise.plans import PLANS_DIR


def prose_prompts(tokenizer, lengths):
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    ids = tokenizer(text).input_ids
    return [ids[1000 * i: 1000 * i + n] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("plan", [pytest.param("dense", id="dense", marks=pytest.mark.slow),
                                  pytest.param("uniform:0.25", id="uniform25", marks=pytest.mark.slow),
                                  pytest.param(str(PLANS_DIR / "smollm2-135m-d25.json"), id="d25")])   # the smoke test
def test_engine_equals_patched_hf_on_the_embedded_model(real_model, plan):
    model, tokenizer = real_model
    prompts = prose_prompts(tokenizer, (37, 700, 1900))
    llm = LLM(model, plan=plan, tokenizer=tokenizer, kv_cache_memory="1GiB", max_num_batched_tokens=1024)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 12, plan=None if plan == "dense" else plan), len(p)
    stats = llm.last_stats
    assert llm.blocks.num_free == llm.blocks.num_blocks
    if plan != "dense":
        assert stats.peak_kv_bytes < 0.4 * stats.dense_kv_bytes
