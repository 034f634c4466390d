"""headwise's attention backend for vLLM on CUDA: ``--attention-backend HEADWISE``, a subclass of
vLLM's Triton backend (``TRITON_ATTN``).

``register()`` (the plugin entry point) adds the name ``HEADWISE`` to vLLM's backend registry; vLLM
uses it only when asked (``vllm serve ... --attention-backend HEADWISE``). Its ``get_impl_cls``
reads the plan (``plan_source.plan_spec``) from the vLLM config being built:

* no plan: vLLM's own ``TritonAttentionImpl``, nothing of headwise runs;
* a plan: ``HeadwiseTritonImpl``. vLLM's own cache write runs for every layer (the layout is the
  one ``paged_decode`` reads, see ``paged_flash``); layers whose KV heads are all dense run vLLM's
  Triton kernel untouched; other layers attend through ``paged_flash.attend`` (headwise's Triton
  ``paged_decode`` for decode tokens, reading only each head's sink and window blocks, and
  ``sink_window`` for prefill).

With a plan, the metadata builder reports no CUDA-graph support, so vLLM runs attention eagerly
(the adapter reads per-step lengths on the host); without one it reports what vLLM's Triton builder does.

Not run on a GPU yet (there is none where it was written): the adapter's math and the class wiring
are tested on CPU (``tests/integrations/test_paged_flash.py``, ``test_cuda_backend.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadata, TritonAttentionMetadataBuilder)

from ...kinds.kv_rule import LayerRule
from . import CUDA_NAME, paged, paged_flash
from .impl_common import PlanAttention, active_plan, check_layer
from .plan_source import plan_spec

#: The name ``--attention-backend`` takes.
NAME = CUDA_NAME
#: How the start-up log names this backend.
BACKEND = f"HeadwiseTritonBackend (--attention-backend {NAME}, subclass of TRITON_ATTN)"


@dataclass
class HeadwiseTritonMetadata(TritonAttentionMetadata):
    """vLLM's Triton metadata plus headwise's per-step layout (built by the first plan layer)."""

    headwise_step: list = field(default_factory=list)

    def step_layout(self, block_size: int) -> paged.StepLayout:
        if not self.headwise_step:
            self.headwise_step.append(paged_flash.step_layout(self.query_start_loc, self.seq_lens, self.block_table,
                                                              block_size))
        return self.headwise_step[0]


class HeadwiseTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """vLLM's Triton metadata builder, returning ``HeadwiseTritonMetadata``."""

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """No CUDA graphs with a plan (the adapter syncs on per-step lengths); else as vLLM's builder."""
        if plan_spec(vllm_config.additional_config) is not None:
            return AttentionCGSupport.NEVER
        return super().get_cudagraph_support(vllm_config, kv_cache_spec)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HeadwiseTritonMetadata:
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return HeadwiseTritonMetadata(**{name: getattr(base, name) for name in base.__dataclass_fields__})


class HeadwiseTritonImpl(PlanAttention, TritonAttentionImpl):
    """vLLM's Triton attention with one layer's KV heads following the plan.

    ``forward`` sees ``query [T, H, D]``, ``key/value [T, Hkv, D]``, ``kv_cache [P, Hkv, bs, 2*D]``
    (vLLM's CUDA layout, already written by vLLM) and writes ``output [T, H, D]``.
    """

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, use_alibi_sqrt=False, chunk_lookback=-1) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks, use_alibi_sqrt,
                         chunk_lookback)
        self.plan = active_plan(BACKEND)
        check_layer(self.plan, num_heads, num_kv_heads, alibi_slopes, sliding_window, logits_soft_cap, attn_type,
                    kv_sharing_target_layer_name, sinks)

    def fused_output_quant_supported(self, quant_key) -> bool:
        """No fused output quantization: plan layers write plain outputs."""
        return False

    def attend_plan(self, query, key, value, kv_cache, output, attn_metadata, rule: LayerRule,
                    prefill_rule: LayerRule) -> None:
        """The plan's attention over vLLM's CUDA cache (``paged_flash.attend``)."""
        step = attn_metadata.step_layout(kv_cache.shape[2])
        paged_flash.attend(query, key, value, kv_cache, output, step, rule, self.scale, prefill_rule=prefill_rule)


class HeadwiseTritonBackend(TritonAttentionBackend):
    """vLLM's Triton backend whose implementation follows a headwise plan when one is given."""

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[TritonAttentionImpl]:
        return HeadwiseTritonImpl if active_plan(BACKEND) is not None else TritonAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TritonAttentionMetadataBuilder]:
        # Always the subclass (vLLM may ask outside a config context); without a plan it builds
        # vLLM's metadata plus an empty list and reports vLLM's CUDA-graph support.
        return HeadwiseTritonMetadataBuilder
