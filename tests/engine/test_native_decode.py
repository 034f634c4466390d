"""The engine's native decode layers (``kernels.decode_layer`` through ``engine.lean``): the tokens the
torch decode path gives, on every recognised architecture (Qwen2's biases, Qwen3's q/k norms, GQA), the
log says which path ran, and a bf16 engine's greedy tokens against fp32's on the embedded model."""

from __future__ import annotations

import logging

import pytest
import torch

from headwise.engine import LLM
from headwise.kernels.decode_layer import native as layer_native
from tests.conftest import TINY_CONFIGS, make_tiny
from tests.engine.conftest import assert_engine_equals_patched_hf, greedy, random_prompts

pytestmark = pytest.mark.skipif(not layer_native.available(), reason="the native decode layers do not build here")


def engine_tokens(model, plan, prompts, max_tokens, native: bool, **kwargs):
    llm = LLM(model, plan=plan, **{"kv_cache_memory": "16MiB", "block_size": 8, **kwargs})
    assert llm.runner.lean is not None and llm.runner.lean.native is not None
    if not native:
        llm.runner.lean.native = None                                   # the torch ops of engine.lean
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_native_layers_give_the_hf_tokens(arch, caplog):
    model = make_tiny(arch)
    with caplog.at_level(logging.INFO, logger="headwise.engine"):
        assert_engine_equals_patched_hf(model, "uniform:0.25:4", random_prompts([5, 40, 77]), 12)
    assert "in one native call (decode_layer.c" in caplog.text


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_native_and_torch_decode_paths_agree(arch):
    model = make_tiny(arch, seed=1)
    prompts = random_prompts([3, 30, 64], seed=2)
    assert engine_tokens(model, "dense", prompts, 16, True) == engine_tokens(model, "dense", prompts, 16, False)


def test_steps_with_a_short_prefill_chunk_run_pre_and_post_around_the_engine_attention(caplog):
    """A step of a decode token plus a 3-token prompt (<= 8 tokens: the lean path) is not decode-only:
    its layers run native pre/post around the engine's attention, and the tokens are HF's."""
    model = make_tiny("qwen2")
    with caplog.at_level(logging.INFO, logger="headwise.engine"):
        assert_engine_equals_patched_hf(model, "uniform:0.25:4", random_prompts([3, 4]), 6, max_num_batched_tokens=8)
    assert "native pre/post around the engine's attention" in caplog.text


def test_bf16_greedy_tokens_follow_fp32_on_the_embedded_model(real_model):
    """bf16 weights and KV (fp32 activations in the native layers) against fp32: greedy tokens of two prose
    prompts with the d25 plan. bf16 rounding flips a near-tie now and then, after which the texts go
    their own ways, so the check is on the tokens before the first difference."""
    from headwise import load_model
    from headwise.data.prose import corpus_slice

    model, tokenizer = real_model
    prompts = [corpus_slice(tokenizer, offset, 200)[0].tolist() for offset in (0, 5000)]
    plan = "smollm2-135m-d25"
    fp32 = engine_tokens(model, plan, prompts, 32, True, kv_cache_memory="64MiB")
    half, _ = load_model(dtype=torch.bfloat16)
    bf16 = engine_tokens(half, plan, prompts, 32, True, kv_cache_memory="64MiB")
    assert all(len(t) == 32 for t in fp32 + bf16)
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(fp32, bf16)]
    assert min(agree) >= 8, f"bf16 left fp32's greedy tokens after {agree} tokens"


def test_weights_moved_after_the_engine_was_built_are_followed(caplog):
    """The native layers hold raw pointers: a weight replaced after ``LLM(...)`` makes them rebuild, not
    read freed memory, and the tokens follow the new weight."""
    model = make_tiny("llama")
    prompts = random_prompts([6, 20])
    llm = LLM(model, plan="dense", kv_cache_memory="16MiB", block_size=8)
    before = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8),
                                                            use_tqdm=False)]
    proj = model.model.layers[1].mlp.down_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * 3.0)
    with caplog.at_level(logging.INFO, logger="headwise.engine"):
        after = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8),
                                                               use_tqdm=False)]
    assert "native decode layers rebuilt" in caplog.text
    assert after == engine_tokens(model, "dense", prompts, 8, False)
    assert after != before


def test_linears_of_mixed_dtypes_keep_the_torch_ops(caplog):
    model = make_tiny("llama")
    model.model.layers[0].mlp.up_proj.to(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="headwise.engine"):
        llm = LLM(model, plan="dense", kv_cache_memory="16MiB", block_size=8)
    assert llm.runner.lean is not None and llm.runner.lean.native is None
    assert "mix dtypes" in caplog.text
