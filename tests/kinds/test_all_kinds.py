"""One plan with every registered head kind (from the descriptors, no list here): it loads from its files,
runs in HF and in the engine, and shows."""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headwise import Plan, load_plan, patch_model, unpatch_model
from headwise.kinds import registry
from headwise.plan import ModelInfo
from tests.conftest import TINY
from tests.engine.conftest import assert_engine_equals_patched_hf, random_prompts

KINDS = [kind.name for kind in registry.all_kinds()]
HEADS_PER_LAYER = TINY["num_key_value_heads"]


def every_kind_model():
    """A tiny Llama with enough layers for two kinds per layer."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": math.ceil(len(KINDS) / HEADS_PER_LAYER)})
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def example_plan(model, kinds: list[str]) -> Plan:
    """Each kind's example head (``Kind.example``), ``HEADS_PER_LAYER`` per layer in ``kinds`` order (the last
    layer padded with the first kind); random tensors of the shapes each head's ``required_weights`` names."""
    info = ModelInfo.of(model)
    names = kinds + kinds[: (-len(kinds)) % HEADS_PER_LAYER]
    gen = torch.Generator().manual_seed(0)
    layers, weights = [], {}
    for i in range(info.num_layers):
        heads = []
        for h in range(HEADS_PER_LAYER):
            spec = registry.get(names[i * HEADS_PER_LAYER + h]).example_head(info, f"l{i}.h{h}")
            for name, shape in spec.required_weights(info, i, h).items():
                weights[name] = torch.randn(*shape, generator=gen)
            heads.append(spec)
        layers.append(tuple(heads))
    return Plan(info, tuple(layers), {"method": "test"}, weights=weights)


@pytest.fixture
def model():
    return every_kind_model()


def test_plan_with_every_kind_round_trips_and_runs_cached_as_recomputed(model, tmp_path):
    example_plan(model, KINDS).save(tmp_path / "p.json")
    plan = load_plan(tmp_path / "p.json", model)
    assert sorted({h.kind for layer in plan.layers for h in layer}) == sorted(KINDS)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    patch_model(model, plan)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            full = model(out.sequences[:, :-1]).logits          # every position recomputed without a cache
    finally:
        unpatch_model(model)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[0, ids.shape[1] - 1 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("step_tokens", [512, 16], ids=["whole-prompts", "chunked-prefill"])
def test_engine_runs_every_kind_with_the_patched_model_tokens(model, step_tokens):
    engine_kinds = [k for k in KINDS if "engine" in registry.get(k).runtimes]
    assert_engine_equals_patched_hf(model, example_plan(model, engine_kinds), random_prompts((3, 30, 75), seed=5), 8,
                                    max_num_batched_tokens=step_tokens)


@pytest.mark.parametrize("prefill", ["dense", "sparse"])
def test_dense_prefill_runs_every_kind_in_the_engine(model, prefill):
    engine_kinds = [k for k in KINDS if "engine" in registry.get(k).runtimes]
    plan = example_plan(model, engine_kinds)
    assert_engine_equals_patched_hf(model, Plan(plan.model, plan.layers, plan.calibration, prefill, plan.weights),
                                    random_prompts((5, 41), seed=7), 6)


def test_plan_show_lists_every_kind(model, tmp_path, capsys):
    from headwise.cli import main

    example_plan(model, KINDS).save(tmp_path / "p.json")
    assert main(["plan", "show", str(tmp_path / "p.json"), "--lengths", "64,128"]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        count = sum(h.kind == kind for h in load_plan(tmp_path / "p.json").heads)
        assert re.search(rf"^\s*{kind}\s+{count}\s", out, re.M), f"no memory row for {kind}:\n{out}"
