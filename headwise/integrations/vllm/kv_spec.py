"""headwise's KV cache spec and manager for vLLM: all-window layers give blocks back as requests advance.

vLLM 0.32 lets out-of-tree code add a KV cache spec with its own manager through
``vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry`` (no edit of vLLM). This module adds:

* ``SinkWindowSpec``: the spec of a layer whose KV heads all keep a sink and a window (no dense
  head). It subclasses ``AttentionSpec`` (not ``FullAttentionSpec``), so vLLM puts these layers in
  their own KV cache groups with their own block tables (``kv_cache_utils.get_kv_cache_groups``);
  every other layer keeps vLLM's ``FullAttentionSpec`` and holds every block.
* ``SinkWindowManager``: vLLM's full-attention manager whose ``remove_skipped_blocks`` gives back the
  blocks no query still to come reads (``kv_memory.LayerKeep.free_blocks``) and puts vLLM's null
  block in their place, as ``RSWAManager`` does for its gap. Prefix caching works: a hit is the
  longest run of cached blocks from the start, as for full attention (freed blocks stay cached
  until the pool reuses them), and a prompt chunk after a hit reads every block of the run.

``register_kv_spec()`` (called by the plugin's ``register()``) registers the pair after vLLM's own
specs: vLLM registers its built-ins lazily, only while the registry is empty, so registering first
would leave ``FullAttentionSpec`` unknown.

The spec a layer reports is chosen by ``plan_kv_spec`` from the backend's ``customize_spec`` hook,
which in vLLM 0.32 receives the spec but not the layer (vLLM RFC #42449);
``impl_common.requesting_layer_name`` finds which layer vLLM is asking about.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from ...plan import Plan
from .kv_memory import LayerKeep, layer_keep

#: Which all-window layers may share a KV cache group (one block table), the spec's ``group_policy``:
#: "same-blocks": layers holding the same number of blocks at ``max_len`` (no layer holds more than it
#: needs at the longest context; more groups); "union": any (fewest groups; a group holds what its
#: widest layer needs).
GROUP_POLICIES = ("same-blocks", "union")
#: The ``AttentionSpec`` fields every layer of one KV cache group shares.
_ATTENTION_FIELDS = tuple(f.name for f in fields(AttentionSpec) if f.init)


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(AttentionSpec):
    """KV cache spec of layers whose KV heads all keep ``[0, sink)`` and a window (``kv_memory``).

    Page layout and size are those of any attention layer (``AttentionSpec``); ``sink``,
    ``windows``, ``prefill_dense`` and ``max_chunk`` (the most tokens vLLM computes for a request in
    one step) say which blocks the manager may give back.
    """

    sink: int
    windows: tuple[tuple[float, ...], ...]     # (alpha, beta[, min_span]) of every head
    prefill_dense: bool
    max_len: int
    group_policy: str = "same-blocks"
    max_chunk: int = 1                          # vLLM's max_num_batched_tokens (kv_memory.LayerKeep.first_kept)

    @property
    def keep(self) -> LayerKeep:
        return LayerKeep(self.sink, self.windows, self.prefill_dense)

    def kept_blocks(self) -> int:
        """Blocks a request of ``max_len`` tokens holds at its end in this layer (decoding its last token)."""
        first, last = self.keep.free_blocks(self.max_len - 1, 1, self.block_size)
        return -(-self.max_len // self.block_size) - max(0, last - first)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """A full request's blocks: a prompt is held whole until it is in (dense prefill) or while a
        chunk reads it, so the worst case is full attention's."""
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list["SinkWindowSpec"]) -> "SinkWindowSpec":
        """One group's spec: same pages, the union of what its layers keep (larger sink, all windows).

        With ``group_policy`` "same-blocks", layers share a group (one block table) only when they
        hold the same number of blocks at ``max_len``, so that no layer holds more than it needs at
        the longest context. Raises ``AssertionError`` (what vLLM's grouping catches) for specs that
        cannot share a group.
        """
        assert all(isinstance(s, SinkWindowSpec) for s in specs), "a sink+window group holds only SinkWindowSpec"
        first = specs[0]
        assert all(getattr(s, name) == getattr(first, name) for s in specs for name in _ATTENTION_FIELDS), (
            "layers of one KV cache group must have the same page layout")
        assert all((s.max_len, s.prefill_dense, s.group_policy, s.max_chunk)
                   == (first.max_len, first.prefill_dense, first.group_policy, first.max_chunk) for s in specs), (
            "layers of one plan share its context, prefill mode, group policy and token budget")
        keep = first.keep
        for s in specs[1:]:
            keep = keep.union(s.keep)
        merged = cls(**{name: getattr(first, name) for name in _ATTENTION_FIELDS}, sink=keep.sink,
                     windows=keep.windows, prefill_dense=keep.prefill_dense, max_len=first.max_len,
                     group_policy=first.group_policy, max_chunk=first.max_chunk)
        if first.group_policy == "same-blocks":
            assert all(s.kept_blocks() == merged.kept_blocks() for s in specs), "layers hold different block counts"
        return merged

    def is_uniform_with_collection(self, kv_cache_specs: dict) -> bool:
        """Whether all layers can share this spec's block table as vLLM's ``UniformTypeKVCacheSpecs``
        (whose manager uses one layer's spec): only when they all keep exactly the same."""
        return all(isinstance(s, SinkWindowSpec) and s.keep == self.keep for s in kv_cache_specs.values())


class SinkWindowManager(FullAttentionManager):
    """vLLM's full-attention manager that gives back the blocks a ``SinkWindowSpec`` group no longer reads."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.keep = kv_cache_spec.keep
        self.max_chunk = kv_cache_spec.max_chunk

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Free the request's blocks outside its sink and the windows of every query still to come.

        vLLM calls this before each allocation with the processed (committed) token count and the
        prompt length; without a prompt length nothing is freed. vLLM nulls the freed entries in this
        manager's block table only: the worker's table keeps their ids, which headwise's attention nulls
        itself every step (``paged.null_unread``).
        """
        if num_prompt_tokens is None:
            return
        first, last = self.keep.free_blocks(processed_computed_tokens, num_prompt_tokens, self.block_size,
                                            self.max_chunk)
        self._remove_blocks_in_range(request_id, first, last)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        """Full attention's lookup (the longest run of cached blocks from the start) on this group."""
        as_full = FullAttentionSpec(**{name: getattr(kv_cache_spec, name) for name in _ATTENTION_FIELDS})
        return super().find_longest_cache_hit(block_hashes, max_length, kv_cache_group_ids, block_pool, as_full,
                                              drop_eagle_block, alignment_tokens, dcp_world_size, pcp_world_size)


def register_kv_spec() -> None:
    """Register ``SinkWindowSpec`` with ``SinkWindowManager`` in vLLM's registry, after vLLM's built-ins."""
    KVCacheSpecRegistry._ensure_registered()        # built-ins first: they register only into an empty registry
    KVCacheSpecRegistry.register(SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec)


def plan_kv_spec(plan: Plan, layer_index: int, spec: AttentionSpec, max_len: int,
                 heads: list[int] | None = None, group_policy: str = "same-blocks",
                 max_chunk: int = 1) -> AttentionSpec:
    """The KV cache spec of layer ``layer_index`` under ``plan``.

    Args:
        plan: the active plan; layer_index: the layer's row in it.
        spec: the spec vLLM built for the layer (a plain ``FullAttentionSpec`` for the layers the
            plugin runs: it refuses models with sliding windows or chunked local attention).
        max_len: vLLM's ``max_model_len``.
        heads: the KV heads this spec holds (default all; ``split.py`` gives a layer's window heads).
        group_policy: which all-window layers may share a KV cache group (``GROUP_POLICIES``).
        max_chunk: vLLM's ``max_num_batched_tokens`` (the most tokens of a request one step computes).

    Returns:
        A ``SinkWindowSpec`` with the same pages when every KV head of the layer keeps a sink and a
        window; ``spec`` unchanged when one head is dense (one block holds every KV head, so such a
        layer holds every block).
    """
    row = plan.layers[layer_index]
    keep = layer_keep(row if heads is None else tuple(row[h] for h in heads), plan.prefill == "dense")
    if keep is None or type(spec) is not FullAttentionSpec:
        return spec
    return SinkWindowSpec(**{name: getattr(spec, name) for name in _ATTENTION_FIELDS}, sink=keep.sink,
                          windows=keep.windows, prefill_dense=keep.prefill_dense, max_len=max_len,
                          group_policy=group_policy, max_chunk=max_chunk)
