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

import logging
from dataclasses import dataclass, field

import torch
from vllm.config.vllm import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from ...patches.runtime import LayerRule
from ...plan import Plan, PlanError
from . import paged
from .plan_source import describe, load_plan_for_vllm, plan_spec

logger = logging.getLogger("vllm.headwise")    # under vLLM's logger: its handler and format

_loaded: dict[tuple[str, str], Plan] = {}


def active_plan() -> Plan | None:
    """The plan of the vLLM config being built or run in this process, ``None`` without one.

    Loaded once per (spec, model) and logged once; raises ``PlanError`` (one sentence) when the
    plan cannot be used for this model.
    """
    config = get_current_vllm_config_or_none()
    model_config = config.model_config if config is not None else None
    if model_config is None:          # no engine being built (e.g. a backend listing): nothing to run
        return None
    spec = plan_spec(config.additional_config)
    if spec is None:
        return None
    key = (spec, str(model_config.model))
    if key not in _loaded:
        plan = load_plan_for_vllm(spec, model_config.hf_config)
        if config.cache_config.cache_dtype not in ("auto", None) and str(config.cache_config.cache_dtype) != "auto":
            raise PlanError(f"the vLLM plugin reads an unquantized KV cache, but --kv-cache-dtype is "
                            f"{config.cache_config.cache_dtype!r}; drop that flag or serve without a plan.")
        _loaded[key] = plan
        logger.info("headwise: attention backend HeadwiseCPUBackend (overrides %s) active with %s; span N = each "
                    "sequence's length at the end of the step that computes it", HeadwiseCPUBackend.get_name(),
                    describe(plan, spec))
    return _loaded[key]


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


class HeadwiseCPUImpl(CPUAttentionBackendImpl):
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
        self.plan = active_plan()
        unsupported = [name for name, bad in (
            ("a sliding window of its own", sliding_window is not None),
            ("ALiBi slopes", alibi_slopes is not None),
            ("a logits soft cap", bool(logits_soft_cap)),
            ("learned attention sinks", sinks is not None),
            (f"{attn_type!r} attention", attn_type != AttentionType.DECODER),
            ("a KV cache shared with another layer", kv_sharing_target_layer_name is not None),
        ) if bad]
        if unsupported:
            raise PlanError(f"an attention layer of this model has {unsupported[0]}, which the vLLM plugin does not "
                            "combine with a headwise plan; serve this model without a plan.")
        if self.plan is not None and (num_kv_heads != self.plan.model.num_kv_heads or
                                      num_heads != self.plan.model.num_heads):
            raise PlanError(f"vLLM runs {num_heads} query / {num_kv_heads} KV heads per layer but the plan is for "
                            f"{self.plan.model.num_heads} / {self.plan.model.num_kv_heads}; the plugin does not run "
                            "plans under tensor parallelism yet, so serve with --tensor-parallel-size 1.")
        self._rule: LayerRule | None = None

    def rule(self, layer) -> LayerRule:
        """The layer's sink/span rule, from its name (``model.layers.<i>.self_attn.attn``)."""
        if self._rule is None:
            from vllm.model_executor.models.utils import extract_layer_index

            index = extract_layer_index(layer.layer_name)
            if not 0 <= index < len(self.plan.layers):
                raise PlanError(f"vLLM layer {layer.layer_name!r} has no row in a plan of {len(self.plan.layers)} "
                                "layers; calibrate a plan for this model.")
            self._rule = LayerRule.from_heads(self.plan.layers[index])
        return self._rule

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Store this step's keys and values: vLLM's own path for all-dense layers, else ``paged.write``."""
        if self.rule(layer).all_dense:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        paged.write(kv_cache, key, value, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """``output [T, H, D]``: vLLM's kernel for all-dense layers, else the plan (``paged.attend``)."""
        if attn_metadata is None or self.rule(layer).all_dense:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by headwise's vLLM backend; "
                                      "serve without output quantization.")
        n = attn_metadata.num_actual_tokens
        step = attn_metadata.step_layout(kv_cache.shape[2], kv_cache.shape[1])
        paged.attend(query[:n], key[:n], value[:n], kv_cache, output[:n], step, self.rule(layer), self.scale)
        return output


class HeadwiseCPUBackend(CPUAttentionBackend):
    """vLLM's ``CPU_ATTN`` backend whose implementation follows a headwise plan when one is given."""

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return HeadwiseCPUImpl if active_plan() is not None else CPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        # Always the subclass: vLLM may ask for it outside a config context, and without a plan its
        # only difference (an empty per-step layout list) is never read.
        return HeadwiseCPUMetadataBuilder
