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
