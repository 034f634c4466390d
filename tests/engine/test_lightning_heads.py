"""Lightning heads (a recurrent state, no KV) in the engine: same tokens as the patched HF model."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import make_tiny
from tests.engine.conftest import (assert_engine_equals_patched_hf, assert_preemption_keeps_the_tokens,
                                   random_prompts)
from tests.kinds.test_lightning import lightning_plan

LENGTHS = (1, 6, 45, 170)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("step_tokens", [512, 32], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_lightning_plan_equals_patched_hf(arch, step_tokens):
    model = make_tiny(arch)
    llm, outs = assert_engine_equals_patched_hf(model, lightning_plan(model), random_prompts(LENGTHS, seed=3), 10,
                                                max_num_batched_tokens=step_tokens)
    for out in outs:
        assert out.kv["state_bytes"] > 0
        assert out.kv["peak_bytes_by_kind"]["lightning"] == 0          # no KV blocks for lightning heads
    assert llm.last_stats.peak_state_bytes > 0


def test_lightning_state_survives_preemption():
    model = make_tiny("llama")
    assert_preemption_keeps_the_tokens(model, lightning_plan(model))


def test_dense_prefill_with_lightning_heads_equals_patched_hf():
    model = make_tiny("llama")
    plan = dataclasses.replace(lightning_plan(model), prefill="dense")
    assert_engine_equals_patched_hf(model, plan, random_prompts((7, 90), seed=6), 8)
