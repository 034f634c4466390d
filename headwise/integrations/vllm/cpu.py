"""headwise's attention backend for vLLM on CPU: a subclass of vLLM's ``CPU_ATTN`` backend.

``register()`` (the plugin entry point) makes ``CPU_ATTN`` resolve to ``HeadwiseCPUBackend``. Its
``get_impl_cls`` reads the plan (``plan_source.plan_spec``) from the vLLM config being built:

* no plan: vLLM's own ``CPUAttentionBackendImpl``, nothing of headwise runs;
* a plan: ``HeadwiseCPUImpl``. Layers whose KV heads are all dense run vLLM's implementation
  untouched (its cache write and its kernel); other layers write their cache with ``paged.write``
  (plain ``[bs, D]`` keys and values per block and head) and attend through ``paged.attend``
  (headwise's ``paged_decode`` / ``sink_window`` kernels).

The plan is loaded and checked once per process when the model is built, so a bad plan stops
``vllm serve`` / ``LLM(...)`` at start-up with one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from ...kinds.kv_rule import LayerRule
from . import paged
from .impl_common import PlanAttention, active_plan, check_layer

#: How the start-up log names this backend.
BACKEND = "HeadwiseCPUBackend (overrides CPU_ATTN)"


@dataclass
class HeadwiseCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus headwise's per-step layout (built by the first plan layer)."""

    headwise_step: list = field(default_factory=list)

    def step_layout(self, block_size: int, num_kv_heads: int) -> paged.StepLayout:
        if not self.headwise_step:
            self.headwise_step.append(paged.StepLayout.build(self.query_start_loc, self.seq_lens, self.block_table,
                                                             block_size, num_kv_heads))
        return self.headwise_step[0]


class HeadwiseCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder, returning ``HeadwiseCPUMetadata``."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HeadwiseCPUMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return HeadwiseCPUMetadata(**{name: getattr(base, name) for name in base.__dataclass_fields__})


class HeadwiseCPUImpl(PlanAttention, CPUAttentionBackendImpl):
    """vLLM's CPU attention with one layer's KV heads following the plan.

    ``forward`` sees ``query [T, H, D]``, ``key/value [T, Hkv, D]``, ``kv_cache [P, Hkv, bs, 2*D]``
    and writes ``output [T, H, D]``. The layer (hence its plan row) is known from
    ``layer.layer_name`` on first use.
    """

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.plan = active_plan(BACKEND)
        check_layer(self.plan, num_heads, num_kv_heads, alibi_slopes, sliding_window, logits_soft_cap, attn_type,
                    kv_sharing_target_layer_name, sinks)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Store this step's keys and values: vLLM's own path for all-dense layers, else ``paged.write``."""
        if self.rule(layer).all_dense:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        paged.write(kv_cache, key, value, slot_mapping)

    def attend_plan(self, query, key, value, kv_cache, output, attn_metadata, rule: LayerRule,
                    prefill_rule: LayerRule) -> None:
        """The plan's attention over vLLM's CPU cache (``paged.attend``)."""
        step = attn_metadata.step_layout(kv_cache.shape[2], kv_cache.shape[1])
        paged.attend(query, key, value, kv_cache, output, step, rule, self.scale, prefill_rule=prefill_rule)


class HeadwiseCPUBackend(CPUAttentionBackend):
    """vLLM's ``CPU_ATTN`` backend whose implementation follows a headwise plan when one is given."""

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return HeadwiseCPUImpl if active_plan(BACKEND) is not None else CPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        # Always the subclass: vLLM may ask for it outside a config context, and without a plan its
        # only difference (an empty per-step layout list) is never read.
        return HeadwiseCPUMetadataBuilder
