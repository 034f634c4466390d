"""What headwise's CPU and CUDA attention implementations for vLLM share: the active plan, the
start-up checks of a layer, a layer's sink/span rule, and ``forward`` (``PlanAttention``).

Imports vLLM's config module (not a backend), so both ``cpu.py`` and ``cuda.py`` use it.
"""

from __future__ import annotations

import logging
import sys

from vllm.config.vllm import get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType

from ...kinds.kv_rule import LayerRule
from ...plan import Plan, PlanError
from .plan_source import PREFILL_KEY, describe, load_plan_for_vllm, plan_spec

logger = logging.getLogger("vllm.headwise")    # under vLLM's logger: its handler and format

_loaded: dict[tuple[str, str], Plan] = {}


def active_plan(backend: str) -> Plan | None:
    """The plan of the vLLM config being built or run in this process, ``None`` without one.

    Loaded once per (spec, model) and logged once, naming ``backend`` (e.g. ``"HeadwiseCPUBackend
    (overrides CPU_ATTN)"``); raises ``PlanError`` (one sentence) when the plan cannot be used for
    this model.
    """
    config = get_current_vllm_config_or_none()
    model_config = config.model_config if config is not None else None
    if model_config is None:          # no engine being built (e.g. a backend listing): nothing to run
        return None
    spec = plan_spec(config.additional_config)
    if spec is None:
        return None
    prefill = (config.additional_config or {}).get(PREFILL_KEY)
    key = (spec, str(model_config.model), prefill)
    if key not in _loaded:
        plan = load_plan_for_vllm(spec, model_config.hf_config, prefill)
        if str(config.cache_config.cache_dtype) not in ("auto", "None"):
            raise PlanError(f"the vLLM plugin reads an unquantized KV cache, but --kv-cache-dtype is "
                            f"{config.cache_config.cache_dtype!r}; drop that flag or serve without a plan.")
        _loaded[key] = plan
        logger.info("headwise: attention backend %s active with %s; span N = each sequence's length at the end "
                    "of the step that computes it", backend, describe(plan, spec))
    return _loaded[key]


def check_layer(plan: Plan | None, num_heads: int, num_kv_heads: int, alibi_slopes, sliding_window, logits_soft_cap,
                attn_type, kv_sharing_target_layer_name, sinks) -> None:
    """Refuse (``PlanError``, one sentence) an attention layer the plugin cannot combine with a plan.

    Arguments are those vLLM gives an attention implementation's ``__init__``.
    """
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
    if plan is not None and (num_kv_heads != plan.model.num_kv_heads or num_heads != plan.model.num_heads):
        raise PlanError(f"vLLM runs {num_heads} query / {num_kv_heads} KV heads per layer but the plan is for "
                        f"{plan.model.num_heads} / {plan.model.num_kv_heads}; the plugin does not run "
                        "plans under tensor parallelism yet, so serve with --tensor-parallel-size 1.")


def layer_index(plan: Plan, layer_name: str) -> int:
    """The plan row of vLLM layer ``layer_name`` (``model.layers.<i>.self_attn.attn`` -> ``i``)."""
    from vllm.model_executor.models.utils import extract_layer_index

    index = extract_layer_index(layer_name)
    if not 0 <= index < len(plan.layers):
        raise PlanError(f"vLLM layer {layer_name!r} has no row in a plan of {len(plan.layers)} "
                        "layers; calibrate a plan for this model.")
    return index


def layer_rule(plan: Plan, layer_name: str) -> LayerRule:
    """The sink/span rule of vLLM layer ``layer_name`` (``model.layers.<i>.self_attn.attn``)."""
    return LayerRule.from_heads(plan.layers[layer_index(plan, layer_name)])


def requesting_layer():
    """The attention layer vLLM is building or asking about, found on the call stack, or ``None``.

    vLLM 0.32 gives neither an attention implementation's ``__init__`` nor the backend's
    ``customize_spec(spec)`` classmethod the layer (``v1/worker/utils.py``
    ``customize_attention_spec``; vLLM RFC #42449 proposes backends building specs themselves), and
    calls the latter outside ``set_current_vllm_config``. The caller's frames hold the layer
    (``Attention.__init__``'s ``self``; the model runner's loop over attention layers in
    ``gpu_model_runner.get_kv_cache_spec``), so this returns the attention-like layer
    (``AttentionLayerBase``) of the nearest frame that holds one.
    """
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    frame = sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, AttentionLayerBase):
                return value
        frame = frame.f_back
    return None


class PlanAttention:
    """Mixin placed before a vLLM attention implementation (``class X(PlanAttention, VllmImpl)``).

    The subclass sets ``self.plan`` and implements ``attend_plan``; ``forward`` runs vLLM's own
    kernel for all-dense layers (and metadata-less profiling runs), the plan for the others.
    """

    plan: Plan | None
    _rule: LayerRule | None = None
    _prefill_rule: LayerRule | None = None

    def rule(self, layer) -> LayerRule:
        """The layer's sink/span rule, from its name (``model.layers.<i>.self_attn.attn``)."""
        if self._rule is None:
            self._rule = layer_rule(self.plan, layer.layer_name)
        return self._rule

    def prefill_rule(self, layer) -> LayerRule:
        """The rule of prefill tokens: the layer's own, or every head dense for a plan that prefills dense
        (vLLM's cache holds every key, so a dense prefill reads them all; decode tokens follow the plan)."""
        if self._prefill_rule is None:
            rule = self.rule(layer)
            self._prefill_rule = rule.as_dense() if self.plan.prefill == "dense" else rule
        return self._prefill_rule

    def attend_plan(self, query, key, value, kv_cache, output, attn_metadata, rule: LayerRule,
                    prefill_rule: LayerRule) -> None:
        """Write ``output [n, H, D]`` for the step's ``n`` real tokens: decode tokens by ``rule``,
        prefill tokens by ``prefill_rule``."""
        raise NotImplementedError

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """``output [T, H, D]``: vLLM's kernel for all-dense layers, else ``attend_plan``."""
        if attn_metadata is None or self.rule(layer).all_dense:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by headwise's vLLM backend; "
                                      "serve without output quantization.")
        n = attn_metadata.num_actual_tokens
        self.attend_plan(query[:n], key[:n], value[:n], kv_cache, output[:n], attn_metadata, self.rule(layer),
                         self.prefill_rule(layer))
        return output
