"""Shared pieces of the vLLM integration tests: prompts, the HF reference, running vLLM in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: vLLM's CPU settings for this 2-core machine (docs/design.md): both cores, no reserved core, small cache.
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}


def prose_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of real English prose (CPython's ``pydoc_data.topics``), BOS first."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text[offset * 4: offset * 4 + 8 * n], add_special_tokens=False).input_ids[: n - 1]
    return [tokenizer.bos_token_id, *ids]


def short_prompts(tokenizer) -> list[list[int]]:
    """Three short prompts of different lengths (no shared 32-token prefix)."""
    texts = ["The capital of France is", "Write a short poem about the sea. The sea",
             "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    return [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False).input_ids] for t in texts]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of a (patched or plain) HF model with its cache: prefill, then one token per step.

    No ``expected_length``: elastic spans use each sequence's current length, the plugin's rule.
    """
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    cache, tokens = out.past_key_values, []
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(max_new_tokens):
        tokens.append(int(token))
        if len(tokens) == max_new_tokens:
            break
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return tokens


def vllm_env(**extra: str) -> dict[str, str]:
    """Environment of a vLLM subprocess: ``VLLM_ENV``, no ``HEADWISE_PLAN``, and this checkout's
    ``headwise`` first on the path (the plugin entry point imports ``headwise`` in vLLM's processes)."""
    env = {**os.environ, **VLLM_ENV, **extra}
    env.pop("HEADWISE_PLAN", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_vllm(model_dir: str, plan: str | None, prompts: list[list[int]], max_tokens: int, timeout: int = 600,
             measure: bool = False, then: list[list[int]] | None = None, **llm) -> dict:
    """Greedy generation with ``vllm.LLM`` in a subprocess (``vllm_run.py``).

    Returns ``{"tokens": [[ids]...], "num_gpu_blocks": int}`` on success (with ``measure``, the
    engine core runs in that process and the result adds the blocks in use after each step: see
    ``vllm_run.py``), or ``{"error": returncode, "log": stdout + stderr}`` when vLLM did not start or
    failed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp, "request.json"), Path(tmp, "result.json")
        request.write_text(json.dumps({"model": model_dir, "plan": plan, "prompts": prompts,
                                       "max_tokens": max_tokens, "llm": llm, "measure": measure,
                                       "then": then}))
        env = vllm_env()
        proc = subprocess.run([sys.executable, str(HERE / "vllm_run.py"), str(request), str(result)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.exists():
            return {"error": proc.returncode, "log": proc.stdout + proc.stderr}
        return json.loads(result.read_text()) | {"log": proc.stdout + proc.stderr}


def shuffled_tables(lengths: list[int], block_size: int, spare: int) -> tuple[torch.Tensor, int]:
    """vLLM-style block tables for sequences of ``lengths`` tokens over shuffled physical blocks.

    Returns ``(tables [B, max blocks] int32, num_blocks)``: the pool has the blocks the sequences need
    plus ``spare``; block 0 is vLLM's null block, so no table uses it (unused entries are 0).
    """
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + spare
    perm = torch.randperm(num_blocks - 1) + 1
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    used = 0
    for b, nb in enumerate(need):
        tables[b, :nb] = perm[used:used + nb]
        used += nb
    return tables, num_blocks
