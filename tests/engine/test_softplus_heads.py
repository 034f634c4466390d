"""Softplus heads (LSSA / LSSAR over a normal KV cache) in the engine: same tokens as the patched HF model."""

from __future__ import annotations

import pytest

from headwise.engine.groups import SoftmaxEngineGroup
from headwise.kinds.softplus.engine import softplus_engine_group
from headwise.kinds.softplus import Softplus
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.conftest import make_tiny
from tests.engine.conftest import (assert_engine_equals_patched_hf, assert_preemption_keeps_the_tokens,
                                   random_prompts)
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
    _, outs = assert_engine_equals_patched_hf(model, mixed_plan(model), random_prompts(LENGTHS, seed=3), 10,
                                              max_num_batched_tokens=step_tokens)
    for out in outs:
        assert out.kv["peak_bytes_by_kind"]["softplus"] > 0


def test_softplus_with_lightning_and_an_elastic_window_equals_patched_hf():
    """All four kinds in one plan; the LSSA head's span grows with each request's own length."""
    model = make_tiny("llama")
    base = lightning_plan(model)                  # layer 0: lightning + dense; layer 1: window + lightning
    plan = plan_of(model, [(base.layers[0][0], LSSA), (base.layers[1][0], LSSAR)], base.weights)
    assert_engine_equals_patched_hf(model, plan, random_prompts((7, 90, 150), seed=4), 12)


def test_softplus_heads_survive_preemption():
    model = make_tiny("llama")
    assert_preemption_keeps_the_tokens(model, mixed_plan(model), max_tokens=30, tight_memory="104KiB")


def test_plain_softmax_softplus_heads_run_as_softmax_kv():
    model = make_tiny("llama")
    assert isinstance(softplus_engine_group(0, (0, 1), (SOFTMAX, SOFTMAX), {}), SoftmaxEngineGroup)
    plan = plan_of(model, [(SOFTMAX, Softplus(nonlinearity="exp", scale="none", sink=2, alpha=9.0, beta=0.0))] * 2)
    assert_engine_equals_patched_hf(model, plan, random_prompts((30, 120), seed=6), 8)
