"""Paged-KV decode engine with continuous batching: every KV head keeps only its own span (docs/design.md, "The engine").

``from headwise.engine import LLM, SamplingParams``; ``LLM(model, plan=...).generate(prompts, params)``,
``.chat(messages, params)``, ``.stream(prompts, params)`` (text deltas).
Modules: ``block_manager`` (free list, per-head tables), ``scheduler`` (continuous batching,
chunked prefill, preemption), ``runner`` (the HF model's modules over the paged pool), ``groups``
(how each head kind keeps KV and runs attention), ``sampling`` (vLLM's ``SamplingParams``, penalties,
the sampler), ``detokenize`` (incremental text deltas), ``llm`` (the API).
"""

from .llm import LLM, EngineStats, StreamEvent
from .sampling import SamplingParams
from .sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineStats", "StreamEvent"]
