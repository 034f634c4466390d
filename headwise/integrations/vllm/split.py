"""A layer's dense KV heads in a KV cache group of their own, so its window heads can give blocks back.

One vLLM block holds every KV head of a layer, and one attention layer has one KV cache spec, one
cache tensor and one block table (``gpu_model_runner.get_kv_cache_spec`` maps each attention-like
layer of the static forward context to one spec). A layer with dense and window heads therefore
holds every block of every head. To split it, the plugin registers, while vLLM builds the layer, a
second attention-like layer (``HeadwiseKVPart``, an ``AttentionLayerBase`` as vLLM's Mamba layers
are) named ``<layer>.headwise_dense`` in the static forward context. vLLM then:

* asks it for its spec: full attention over the dense heads only (``num_kv_heads`` = dense heads);
* gives it its own KV cache tensor (``bind_kv_cache``), block table, slot mapping and attention
  metadata, like any layer of its group;

and the real layer reports a ``SinkWindowSpec`` over its window heads only. The real layer's
attention writes and reads both caches (``cpu.HeadwiseCPUImpl``): its window heads by the plan, its
dense heads with vLLM's own CPU write and kernel (full attention) on the part's cache. Block sizes are chosen so every
page has the bytes of a whole layer's page (``block_size * Hkv / heads``): vLLM's KV cache groups
share one pool of equal pages (``kv_cache_utils.unify_kv_cache_spec_page_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

#: Suffix of the part layer's name (``model.layers.<i>.self_attn.attn.headwise_dense``: one integer,
#: so vLLM's ``extract_layer_index`` gives the real layer's index).
PART_SUFFIX = ".headwise_dense"


class HeadwiseKVPart(AttentionLayerBase):
    """The dense KV heads of one split layer, as vLLM sees them: a spec, a backend, a cache.

    It runs no attention of its own; the real layer reads ``kv_cache`` and its metadata.
    """

    def __init__(self, name: str, backend, num_heads: int, num_kv_heads: int, head_size: int,
                 dtype: torch.dtype, block_size: int) -> None:
        self.layer_name = name
        self.backend = backend
        self.num_heads = num_heads                 # query heads vLLM's metadata builders size scratch by
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.dtype = dtype
        self.block_size = block_size
        self.kv_cache = torch.tensor([])
        self.isa = None                            # vLLM's CPU cache layout, set by the group's metadata builder
        # KV scales vLLM's own write and kernel read: 1 (the plugin refuses quantized KV caches)
        self._k_scale_float = self._v_scale_float = 1.0

    def get_attn_backend(self):
        return self.backend

    def get_kv_cache_spec(self, vllm_config) -> KVCacheSpec:
        return FullAttentionSpec(block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                                 head_size=self.head_size, dtype=self.dtype)


@dataclass(frozen=True)
class Split:
    """How one layer's heads are split: KV heads ``window`` stay, ``dense`` go to ``part``.

    ``window_q`` / ``dense_q`` are the query heads reading them (``[n]`` int64).
    """

    window: torch.Tensor
    dense: torch.Tensor
    window_q: torch.Tensor
    dense_q: torch.Tensor
    window_block_size: int
    part: HeadwiseKVPart


def split_block_size(block_size: int, num_kv_heads: int, heads: int) -> int | None:
    """The block size giving ``heads`` KV heads the page of ``num_kv_heads`` at ``block_size``, or None."""
    tokens = block_size * num_kv_heads
    return tokens // heads if tokens % heads == 0 else None


def make_split(layer, dense: list[bool], backend, block_size: int, static_forward_context: dict) -> Split | None:
    """Register the dense part of ``layer`` (an ``Attention`` being built) when its heads are mixed.

    Args:
        layer: vLLM's ``Attention`` under construction (``layer_name``, ``num_heads``,
            ``num_kv_heads``, ``head_size``, ``kv_cache_torch_dtype`` already set).
        dense: per KV head, whether the plan's head is dense.
        backend: the attention backend class the part reports (headwise's).
        block_size: vLLM's ``cache_config.block_size``.
        static_forward_context: vLLM's ``compilation_config.static_forward_context``.

    Returns:
        The ``Split``, or ``None`` when the layer is all dense or all window, or when no whole block
        size gives each part a full layer's page.
    """
    n_dense = sum(dense)
    hkv = layer.num_kv_heads
    if n_dense in (0, hkv):
        return None
    window_bs = split_block_size(block_size, hkv, hkv - n_dense)
    dense_bs = split_block_size(block_size, hkv, n_dense)
    if window_bs is None or dense_bs is None:
        return None
    name = layer.layer_name + PART_SUFFIX
    if name in static_forward_context:
        raise ValueError(f"Duplicate layer name: {name}")
    part = HeadwiseKVPart(name, backend, layer.num_heads, n_dense, layer.head_size, layer.kv_cache_torch_dtype,
                          dense_bs)
    static_forward_context[name] = part
    group = layer.num_heads // hkv
    heads = torch.arange(hkv)
    is_dense = torch.tensor(dense)

    def queries(kv: torch.Tensor) -> torch.Tensor:
        return (kv[:, None] * group + torch.arange(group)).reshape(-1)

    return Split(heads[~is_dense], heads[is_dense], queries(heads[~is_dense]), queries(heads[is_dense]), window_bs,
                 part)


def plan_specs(plan, block_size: int, dtype: torch.dtype, max_len: int, split: bool = True,
               group_policy: str = "same-blocks") -> dict[str, KVCacheSpec]:
    """The KV cache spec of every layer (and split part) as the CPU plugin reports them to vLLM.

    For offline study of vLLM's grouping (``benchmarks/vllm_kv_groups.py``): the same rules as
    ``cpu.HeadwiseCPUImpl`` / ``HeadwiseCPUBackend.customize_spec`` on a Llama-style model
    (``model.layers.<i>.self_attn.attn``), without building the model.
    """
    from .kv_spec import plan_kv_spec

    info = plan.model
    specs: dict[str, KVCacheSpec] = {}
    for i, row in enumerate(plan.layers):
        name = f"model.layers.{i}.self_attn.attn"
        dense = [h.kv_rule()[3] for h in row]
        n_dense, hkv = sum(dense), info.num_kv_heads
        base = FullAttentionSpec(block_size=block_size, num_kv_heads=hkv, head_size=info.head_dim, dtype=dtype)
        window_bs = split_block_size(block_size, hkv, hkv - n_dense) if 0 < n_dense < hkv else None
        dense_bs = split_block_size(block_size, hkv, n_dense) if 0 < n_dense < hkv else None
        if split and window_bs is not None and dense_bs is not None:
            heads = [h for h, d in enumerate(dense) if not d]
            main = FullAttentionSpec(block_size=window_bs, num_kv_heads=len(heads), head_size=info.head_dim,
                                     dtype=dtype)
            specs[name + PART_SUFFIX] = FullAttentionSpec(block_size=dense_bs, num_kv_heads=n_dense,
                                                          head_size=info.head_dim, dtype=dtype)
            specs[name] = plan_kv_spec(plan, i, main, max_len, heads, group_policy)
        else:
            specs[name] = plan_kv_spec(plan, i, base, max_len, None, group_policy)
    return specs
