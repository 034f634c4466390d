"""A layer's heads grouped by kind family: run each group, scatter outputs back into head order."""

from __future__ import annotations

from typing import Mapping

import torch

from ..plan import HeadSpec
from .base import AttentionCall, KindGroup, group_factory
from .kv_rule import LayerRule


class LayerKinds:
    """The kind groups of one layer.

    ``rule`` is the KV every head keeps (the cache's rule); ``groups`` run in order of their
    first head. A layer of one family calls its group with the whole layer (no gather/scatter):
    all dense stays transformers' sdpa, bit for bit.
    """

    def __init__(self, layer_idx: int, specs: tuple[HeadSpec, ...], weights: Mapping[str, torch.Tensor] | None = None):
        self.layer_idx = layer_idx
        self.num_kv_heads = len(specs)
        by_family: dict[str, list[int]] = {}
        for h, spec in enumerate(specs):
            group_factory(spec, f"layer {layer_idx} head {h}")
            by_family.setdefault(spec.family, []).append(h)
        self.rule = LayerRule.from_heads(specs)
        self.groups: list[KindGroup] = [
            group_factory(specs[heads[0]], f"layer {layer_idx}")(layer_idx, tuple(heads),
                                                                 tuple(specs[h] for h in heads), weights or {})
            for heads in by_family.values()]
        self.single = len(self.groups) == 1

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``q [B, H, Q, D]``, ``k, v [B, Hkv, S, D]`` -> ``[B, Q, H, D]`` (HF layout), each head by its kind."""
        if self.single:
            return self.groups[0].attention(q, k, v, call)
        B, H, Q, D = q.shape
        G = H // self.num_kv_heads
        out = q.new_empty(B, Q, H, v.shape[-1])
        for group in self.groups:
            heads = list(group.heads)
            kv_index = torch.tensor(heads, device=q.device)
            q_index = (kv_index[:, None] * G + torch.arange(G, device=q.device)).reshape(-1)
            sub = call.for_heads(heads, self.num_kv_heads)
            out[:, :, q_index] = group.attention(q.index_select(1, q_index), k.index_select(1, kv_index),
                                                 v.index_select(1, kv_index), sub)
        return out
