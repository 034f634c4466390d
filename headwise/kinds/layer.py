"""A layer's heads grouped by attention target: run each group, scatter outputs back into head order."""

from __future__ import annotations

from typing import Mapping

import torch

from .base import HeadSpec
from .call import AttentionCall, KindGroup, StatefulGroup, query_heads
from .kv_rule import LayerRule
from .registry import kind_of
from .softmax import dense_attention


class LayerKinds:
    """The kind groups of one layer under ``patch_model``.

    ``rule`` is the KV every head keeps (the cache's rule); ``groups`` run in order of their
    first head. A layer of one group calls it with the whole layer (no gather/scatter): all dense
    stays transformers' sdpa, bit for bit. A dense-prefill forward runs the whole layer dense once
    and lets stateful groups fold the forward's keys into their states.
    """

    def __init__(self, layer_idx: int, specs: tuple[HeadSpec, ...], weights: Mapping[str, torch.Tensor] | None = None):
        self.layer_idx = layer_idx
        self.num_kv_heads = len(specs)
        by_target: dict[str, list[int]] = {}
        for h, spec in enumerate(specs):
            by_target.setdefault(kind_of(spec).attention, []).append(h)
        self.rule = LayerRule.from_heads(specs)
        self.groups: list[KindGroup] = [
            kind_of(specs[heads[0]]).group_factory()(layer_idx, tuple(heads), tuple(specs[h] for h in heads),
                                                     weights or {})
            for heads in by_target.values()]
        self.stateful: list[StatefulGroup] = [g for g in self.groups if g.state_key is not None]
        self.single = len(self.groups) == 1

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``q [B, H, Q, D]``, ``k, v [B, Hkv, S, D]`` -> ``[B, Q, H, D]`` (HF layout), each head by its kind."""
        if call.dense_prefill:
            # every head reads all it has; the cache still keeps only the plan's KV, states are built
            for group in self.stateful:
                heads = list(group.heads)
                group.fold(k[:, heads], v[:, heads], call.for_heads(heads, self.num_kv_heads))
            return dense_attention(call.module, q, k, v, call.query_pos, call.key_pos, call.scale)
        if self.single:
            return self.groups[0].attention(q, k, v, call)
        B, H, Q, D = q.shape
        G = H // self.num_kv_heads
        out = q.new_empty(B, Q, H, v.shape[-1])
        for group in self.groups:
            heads = list(group.heads)
            kv_index = torch.tensor(heads, device=q.device)
            q_index = torch.tensor(query_heads(heads, G), device=q.device)
            sub = call.for_heads(heads, self.num_kv_heads)
            out[:, :, q_index] = group.attention(q.index_select(1, q_index), k.index_select(1, kv_index),
                                                 v.index_select(1, kv_index), sub)
        return out
