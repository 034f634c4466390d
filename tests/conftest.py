"""Shared fixtures: tiny random models of several architectures, and the real embedded model."""

from __future__ import annotations

import os

# Triton decides at import whether it interprets; set this before transformers imports Triton so
# the Triton kernel tests run in this process on CPU (a GPU run can set TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

TINY = dict(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
    "qwen3": lambda: Qwen3Config(**TINY),
}


def make_tiny(arch: str = "llama", seed: int = 0):
    """A tiny random causal LM in eval mode, fp32, sdpa attention."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return make_tiny(request.param)


@pytest.fixture
def llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct (safetensors copy cached after the first conversion)."""
    from headwise import load_model

    return load_model()


QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="session")
def qwen_model():
    """Qwen2.5-Coder-0.5B-Instruct (opt-in: ``make fetch-models``); the test skips when it is not fetched.

    Tests using it are marked ``real_model`` and ``slow`` (``pytest_collection_modifyitems``)."""
    from headwise.models import get_entry, is_available, load_model

    if not is_available(QWEN):
        pytest.skip(f"{get_entry(QWEN).display_name} is not fetched (opt-in, ~491 MB); fetch it with "
                    f"`make fetch-models` or `headwise model fetch {QWEN}`")
    return load_model(QWEN)


@pytest.hookimpl(tryfirst=True)          # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "qwen_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def no_grad():
    """Run a test without autograd (modules opt in with ``pytest.mark.usefixtures("no_grad")``)."""
    with torch.no_grad():
        yield
