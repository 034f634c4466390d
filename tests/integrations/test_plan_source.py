"""Where the vLLM plugin finds its plan and what it refuses, without starting vLLM."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
from transformers import LlamaConfig

from headwise.integrations.vllm import plan_spec
from headwise.integrations.vllm.plan_source import load_plan_for_vllm
from headwise.kinds import Kind, registry
from headwise.kinds.dense import Dense
from headwise.plan import Plan, PlanError

CONFIG = dict(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


def test_import_headwise_does_not_import_vllm():
    code = "import headwise, headwise.integrations.vllm, sys; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_spec_sources():
    assert plan_spec({}, {}) is None
    assert plan_spec({"headwise_plan": "p.json"}, {"HEADWISE_PLAN": "dense"}) == "p.json"
    assert plan_spec({}, {"HEADWISE_PLAN": "uniform:0.25"}) == "uniform:0.25"
    assert plan_spec({"other": 1}, {"HEADWISE_PLAN": ""}) is None
    with pytest.raises(PlanError, match="must be a plan path"):
        plan_spec({"headwise_plan": 3}, {})


def test_specs_load_against_a_config_object():
    config = LlamaConfig(**CONFIG)
    assert load_plan_for_vllm("uniform:0.25", config).density(1000) == pytest.approx(0.25, abs=1e-3)
    assert all(h.kind == "dense" for h in load_plan_for_vllm("dense", config).heads)


def test_plan_for_another_model_is_refused(tmp_path):
    Plan.uniform(LlamaConfig(**CONFIG), 0.25).save(tmp_path / "p.json")
    other = LlamaConfig(**{**CONFIG, "num_hidden_layers": 3})
    with pytest.raises(PlanError, match="calibrate a plan for this model"):
        load_plan_for_vllm(str(tmp_path / "p.json"), other)


def test_malformed_plan_is_refused(tmp_path):
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(PlanError, match="is not valid JSON"):
        load_plan_for_vllm(str(tmp_path / "p.json"), LlamaConfig(**CONFIG))


def test_head_kind_the_plugin_cannot_run_is_refused():
    @dataclass(frozen=True)
    class Probe(Dense):
        kind: ClassVar[str] = "probe_vllm_test"

    registry.register_kind(Kind(name=Probe.kind, spec=Probe, attention="headwise.kinds.softmax:SoftmaxKVGroup"))
    try:
        config = LlamaConfig(**CONFIG)
        plan = Plan.dense(config)
        plan = Plan(plan.model, (plan.layers[0], (Probe(), *plan.layers[1][1:])))
        with pytest.raises(PlanError, match="layer 1 head 0 is a 'probe_vllm_test' head, which the vLLM plugin cannot run"):
            load_plan_for_vllm(plan, config)
    finally:
        registry.unregister_kind("probe_vllm_test")


def test_model_with_its_own_sliding_window_is_refused():
    config = LlamaConfig(**CONFIG)
    config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(PlanError, match="sliding-window attention"):
        load_plan_for_vllm("dense", config)


def test_prefill_override():
    config = LlamaConfig(**CONFIG)
    assert load_plan_for_vllm("uniform:0.25", config).prefill == "sparse"
    assert load_plan_for_vllm("uniform:0.25", config, "dense").prefill == "dense"
    with pytest.raises(PlanError, match="'headwise_prefill' must be one of"):
        load_plan_for_vllm("uniform:0.25", config, "window")
