"""headwise's attention backend for vLLM on CPU: a subclass of vLLM's ``CPU_ATTN`` backend.

``register()`` (the plugin entry point) makes ``CPU_ATTN`` resolve to ``HeadwiseCPUBackend``. Its
``get_impl_cls`` reads the plan (``plan_source.plan_spec``) from the vLLM config being built:

* no plan: vLLM's own ``CPUAttentionBackendImpl``, nothing of headwise runs;
* a plan: ``HeadwiseCPUImpl``. Layers whose KV heads are all dense run vLLM's implementation
  untouched (its cache write and its kernel); other layers write their cache with ``paged.write``
  (plain ``[bs, D]`` keys and values per block and head) and attend through ``paged.attend``
  (headwise's ``paged_decode`` / ``sink_window`` kernels; prompt tokens that read every key go through
  vLLM's own kernel over a scratch copy, ``cpu_prefill.py``).

KV memory: ``HeadwiseCPUBackend.customize_spec`` gives all-window layers a ``kv_spec.SinkWindowSpec``
(their blocks outside sink and windows go back to vLLM's pool); a layer with dense and window heads
moves its dense heads to a KV cache group of their own (``split.py``), read with vLLM's own kernel.

The plan is loaded and checked once per process when the model is built, so a bad plan stops
``vllm serve`` / ``LLM(...)`` at start-up with one sentence.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from vllm.config.vllm import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from ...kinds.kv_rule import LayerRule
from ...plan import PlanError
from . import cpu_prefill, paged
from .impl_common import PlanAttention, active_plan, check_layer, layer_index, layer_rule, requesting_layer

#: ``--additional-config`` key: ``false`` keeps a layer with dense and window heads in one KV cache
#: group (every block held) instead of moving its dense heads to a group of their own (``split.py``).
SPLIT_KEY = "headwise_split_heads"
#: ``--additional-config`` key: which all-window layers may share a KV cache group
#: (``kv_spec.GROUP_POLICIES``; default "same-blocks").
GROUPS_KEY = "headwise_kv_groups"

#: How the start-up log names this backend.
BACKEND = "HeadwiseCPUBackend (overrides CPU_ATTN)"


#: ``paged.PositionBuffer`` per cache geometry ``(block size, KV heads)``, shared by every KV cache group
#: of that geometry: groups take their blocks from one pool, so no block id is in two groups' tables at
#: once and each group writes only the rows of its own blocks.
_POSITIONS: dict = {}


@dataclass
class HeadwiseCPUMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus headwise's per-step layout (built by the first plan layer of the group)."""

    headwise_step: dict = field(default_factory=dict)
    headwise_positions: dict | None = None
    headwise_prefilling: torch.Tensor | None = None     # [B] bool: vLLM's is_prefilling
    headwise_unread: Callable | None = None             # block_table -> block_table with unread entries nulled

    def step_layout(self, block_size: int, num_kv_heads: int) -> paged.StepLayout:
        key = (block_size, num_kv_heads)
        if key not in self.headwise_step:
            positions = None
            if self.headwise_positions is not None:
                positions = self.headwise_positions.setdefault(key, paged.PositionBuffer())
            self.headwise_step[key] = paged.StepLayout.build(self.query_start_loc, self.seq_lens, self.block_table,
                                                             block_size, num_kv_heads, positions,
                                                             self.headwise_prefilling, self.headwise_unread)
        return self.headwise_step[key]


class HeadwiseCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata builder, returning ``HeadwiseCPUMetadata``.

    One builder serves one KV cache group (one block table); with a plan it logs the group's spec
    once, so the log says which layers give blocks back (``SinkWindowSpec``) and which hold them all.
    """

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from vllm.config import get_layers_from_vllm_config

        from .split import HeadwiseKVPart

        self.headwise_positions = _POSITIONS  # paged.PositionBuffer per cache geometry, across steps and groups
        for part in get_layers_from_vllm_config(vllm_config, HeadwiseKVPart, layer_names).values():
            part.isa = self.isa                 # vLLM's kernel layout for this group's block size (split.py)
        if active_plan(BACKEND) is not None:
            from .impl_common import logger

            logger.info("headwise: KV cache group of %d layers (%s ...): %s", len(layer_names), layer_names[0],
                        kv_cache_spec)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HeadwiseCPUMetadata:
        """vLLM's metadata plus headwise's. A ``SinkWindowSpec`` group keeps vLLM's block table and the
        means to null its freed (and other unread) entries (``paged.null_unread``; vLLM keeps freed block ids
        in the worker's table), applied only when a reader needs it (``paged.StepLayout.block_table``): a
        decode step through ``paged_decode_logical`` reads only sink and window entries and never does."""
        from .kv_spec import SinkWindowSpec

        m = common_attn_metadata
        if m.is_prefilling is None:
            raise RuntimeError("vLLM gave the attention metadata builder no is_prefilling; headwise's vLLM plugin "
                               "needs vLLM 0.32's CommonAttentionMetadata (install the vLLM version it supports).")
        prefilling = m.is_prefilling[:m.num_reqs]
        if isinstance(self.kv_cache_spec, SinkWindowSpec):
            # only headwise's attention reads these layers: no scheduler metadata for vLLM's kernel
            unread = functools.partial(paged.null_unread, query_start_loc=m.query_start_loc,
                                       seq_lens=m.seq_lens[:m.num_reqs], prefilling=prefilling,
                                       keep=self.kv_cache_spec.keep, block_size=self.kv_cache_spec.block_size)
            return HeadwiseCPUMetadata(num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
                                       query_start_loc=m.query_start_loc, max_seq_len=m.max_seq_len,
                                       seq_lens=m.seq_lens, block_table=m.block_table_tensor,
                                       slot_mapping=m.slot_mapping, scheduler_metadata=None,
                                       headwise_positions=self.headwise_positions, headwise_prefilling=prefilling,
                                       headwise_unread=unread)
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return HeadwiseCPUMetadata(**{name: getattr(base, name) for name in base.__dataclass_fields__},
                                   headwise_positions=self.headwise_positions, headwise_prefilling=prefilling)


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
        config = get_current_vllm_config()
        self.max_model_len = config.model_config.max_model_len
        self.max_chunk = config.scheduler_config.max_num_batched_tokens
        check_layer(self.plan, num_heads, num_kv_heads, alibi_slopes, sliding_window, logits_soft_cap, attn_type,
                    kv_sharing_target_layer_name, sinks)
        self.split, self._part_impl, self._window_rules = None, None, None
        extra = config.additional_config or {}
        self.group_policy = extra.get(GROUPS_KEY, "same-blocks")
        from .kv_spec import GROUP_POLICIES

        if self.group_policy not in GROUP_POLICIES:
            raise PlanError(f"--additional-config {GROUPS_KEY!r} must be one of {list(GROUP_POLICIES)}, got "
                            f"{self.group_policy!r}.")
        layer = requesting_layer()                     # the Attention whose __init__ builds this implementation
        if extra.get(SPLIT_KEY, True) and getattr(layer, "layer_name", None):
            from .split import make_split

            rule = layer_rule(self.plan, layer.layer_name)
            self.split = make_split(layer, rule.dense.tolist(), HeadwiseCPUBackend, config.cache_config.block_size,
                                    config.compilation_config.static_forward_context)
        if self.split is not None:                     # vLLM's own CPU attention over the dense part's heads
            self._part_impl = CPUAttentionBackendImpl(self.split.dense_q.numel(), head_size, scale,
                                                      self.split.dense.numel(), None, None, kv_cache_dtype)

    def part_context(self):
        """The dense part's ``(layer, kv_cache, attention metadata, slot mapping)`` in this step (``split.py``)."""
        ctx = get_forward_context()
        part = self.split.part
        metadata = ctx.attn_metadata[0] if isinstance(ctx.attn_metadata, list) else ctx.attn_metadata
        return part, part.kv_cache, metadata[part.layer_name], ctx.slot_mapping.get(part.layer_name)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Store this step's keys and values: vLLM's own path for all-dense layers, else ``paged.write``
        (a split layer: its window heads by ``paged.write`` here, its dense heads by vLLM's own write
        in its part's cache)."""
        if self.rule(layer).all_dense:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if self.split is None:
            return paged.write(kv_cache, key, value, slot_mapping)
        sp = self.split
        paged.write(kv_cache, key[:, sp.window], value[:, sp.window], slot_mapping)
        part, part_cache, _, part_slots = self.part_context()
        if part_slots is not None:
            self._part_impl.do_kv_cache_update(part, key[:, sp.dense], value[:, sp.dense], part_cache, part_slots)

    def attend_plan(self, query, key, value, kv_cache, output, attn_metadata, rule: LayerRule,
                    prefill_rule: LayerRule) -> None:
        """The plan's attention over vLLM's CPU cache (``paged.attend``). A split layer reads its window
        heads from this layer's cache by the plan and its dense heads from its part's cache with vLLM's
        own kernel (full attention), each through its own block table."""
        if self.split is None:
            step = attn_metadata.step_layout(kv_cache.shape[2], kv_cache.shape[1])
            return paged.attend(query, key, value, kv_cache, output, step, rule, self.scale, prefill_rule=prefill_rule,
                                dense_kernel=cpu_prefill.dense_prefill)
        sp = self.split
        if self._window_rules is None:          # the layer's rules are fixed: select its window heads once
            heads = sp.window.tolist()
            self._window_rules = (rule.select(heads), prefill_rule.select(heads))
        window_rule, window_prefill_rule = self._window_rules
        step = attn_metadata.step_layout(kv_cache.shape[2], kv_cache.shape[1])
        out = torch.empty(query.shape[0], sp.window_q.numel(), query.shape[2], dtype=output.dtype)
        paged.attend(query[:, sp.window_q], key[:, sp.window], value[:, sp.window], kv_cache, out, step,
                     window_rule, self.scale, prefill_rule=window_prefill_rule, dense_kernel=cpu_prefill.dense_prefill)
        output[:, sp.window_q] = out
        part, part_cache, part_metadata, _ = self.part_context()
        out = torch.empty(query.shape[0], sp.dense_q.numel(), query.shape[2], dtype=output.dtype)
        self._part_impl.forward(part, query[:, sp.dense_q], None, None, part_cache, part_metadata, out)
        output[:, sp.dense_q] = out


class HeadwiseCPUBackend(CPUAttentionBackend):
    """vLLM's ``CPU_ATTN`` backend whose implementation follows a headwise plan when one is given.

    With a plan, a layer whose KV heads all keep a sink and a window reports a ``SinkWindowSpec``
    (``kv_spec.py``): vLLM gives its blocks outside the sink and the windows back to the pool as each
    request advances. Other layers keep vLLM's spec.
    """

    @classmethod
    def customize_spec(cls, spec):
        """The layer's spec: ``kv_spec.plan_kv_spec`` for a layer run by a plan, else vLLM's."""
        spec = super().customize_spec(spec)
        layer = requesting_layer()
        impl = getattr(layer, "impl", None)
        if not isinstance(impl, HeadwiseCPUImpl):    # no plan, a split layer's part, or no layer (vLLM sizing pages)
            return spec
        from .kv_spec import plan_kv_spec

        index, heads = layer_index(impl.plan, layer.layer_name), None
        if impl.split is not None:
            heads = impl.split.window.tolist()
            spec = replace(spec, num_kv_heads=len(heads), block_size=impl.split.window_block_size)
        return plan_kv_spec(impl.plan, index, spec, impl.max_model_len, heads, impl.group_policy, impl.max_chunk)

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return HeadwiseCPUImpl if active_plan(BACKEND) is not None else CPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[CPUAttentionMetadataBuilder]:
        # Always the subclass: vLLM may ask for it outside a config context, and without a plan its
        # only difference (an empty per-step layout dict) is never read.
        return HeadwiseCPUMetadataBuilder
