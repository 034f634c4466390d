"""Shared fixtures: tiny random models of several architectures, and the real embedded model."""

from __future__ import annotations

import os

# Triton decides at import whether it interprets; set this before transformers imports Triton so
# the Triton kernel tests run in this process on CPU (a GPU run can set TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")
# No test reaches the hub, whichever test files are collected (the models and data are local).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import random

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

TINY = dict(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, initializer_range=0.2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**TINY, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**TINY, **kw}, sliding_window=None),
    "qwen2": lambda **kw: Qwen2Config(**{**TINY, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**TINY, **kw}),
}


def make_tiny(arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM in eval mode, fp32, sdpa attention (``overrides``: config fields, e.g. ``head_dim``)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](**overrides), attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(autouse=True)
def same_process_state(request):
    """Each test starts from the same process state and leaves it as it found it, so that a test gives the
    same result alone, in its file or in any order: the global random generators seeded, and torch's thread
    count, default dtype and grad mode and the environment variables put back (a CLI run with ``--threads``
    or a library that sets a variable would otherwise change every later test).

    Tests run on one thread: on a 2-core machine that other processes share, a second OpenMP thread waits
    for a busy core at every parallel op (measured: tiny-model tests 5-15x and real-model ones 5x slower on
    two threads than on one when the other core was busy; on a quiet machine a second thread can at most
    halve a test's time). Tests that use ``all_threads`` keep the machine's threads."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    threads, dtype, grad = torch.get_num_threads(), torch.get_default_dtype(), torch.is_grad_enabled()
    env = dict(os.environ)
    if "all_threads" not in request.fixturenames:
        torch.set_num_threads(1)
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
    torch.set_grad_enabled(grad)
    for key in set(os.environ) - set(env):
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


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


@pytest.hookimpl(tryfirst=True)          # before -m selects
def pytest_collection_modifyitems(config, items):
    """Tests that use the ``real_model`` fixture carry the ``real_model`` marker; those that use ``qwen_model``
    carry ``real_model`` and ``slow`` (left out of ``make test``)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "real_model" in fixtures or "qwen_model" in fixtures:
            item.add_marker(pytest.mark.real_model)
        if "qwen_model" in fixtures:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def all_threads():
    """The machine's threads instead of the tests' one (``same_process_state``): for the native kernels, whose
    OpenMP loops split the work over threads (modules opt in with ``pytest.mark.usefixtures("all_threads")``)."""


@pytest.fixture
def no_grad():
    """Run a test without autograd (modules opt in with ``pytest.mark.usefixtures("no_grad")``)."""
    with torch.no_grad():
        yield
