"""Engine test helpers: reference greedy decoding through Hugging Face, prompts, a long-context tiny model."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headwise import expected_length, patch_model, unpatch_model
from headwise.engine import SamplingParams
from tests.conftest import TINY


def hf_greedy(model, ids: list[int], max_tokens: int, plan=None) -> list[int]:
    """Greedy tokens of ``model`` (patched with ``plan`` for the call when given), EOS ignored.

    Elastic spans use ``N = len(ids) + max_tokens``, the length the engine gives each request.
    """
    x = torch.tensor([ids])
    config = model.generation_config
    eos, config.eos_token_id = config.eos_token_id, None
    try:
        if plan is not None:
            patch_model(model, plan)
        with torch.no_grad(), (expected_length(model, len(ids) + max_tokens) if plan is not None
                               else torch.no_grad()):
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
    finally:
        config.eos_token_id = eos
        if plan is not None:
            unpatch_model(model)
    return out[0, len(ids):].tolist()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def random_prompts(lengths, vocab: int = 128, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def make_long_tiny(seed: int = 0, max_positions: int = 4096):
    """A tiny random Llama whose context reaches ``max_positions`` tokens."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "max_position_embeddings": max_positions})
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread and are immune to other processes' OpenMP spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_engine_equals_patched_hf(model, plan, prompts, max_tokens: int, **llm_kwargs):
    """The engine's greedy tokens for ``prompts`` equal the patched HF model's, and every block is freed after.

    Returns the engine's outputs (for a kind's own checks)."""
    from headwise.engine import LLM

    llm = LLM(model, plan=plan, **{"kv_cache_memory": "16MiB", "block_size": 8, **llm_kwargs})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, max_tokens, plan=plan), f"prompt of {len(p)} tokens"
    assert llm.blocks.num_free == llm.blocks.num_blocks
    return llm, outs


def assert_preemption_keeps_the_tokens(model, plan, max_tokens: int = 40, tight_memory: str = "96KiB"):
    """Four long requests in a pool too small for them all: preempted and recomputed, each gets the
    tokens it gets alone."""
    from headwise.engine import LLM

    prompts = random_prompts((150, 160, 170, 140), seed=5)
    params = greedy(max_tokens)
    solo = [LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    tight = LLM(model, plan=plan, kv_cache_memory=tight_memory, block_size=8)
    outs = tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert tight.last_stats.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == solo
