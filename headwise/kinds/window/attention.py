"""Softmax attention over the KV a head keeps: the group of ``window`` and ``dense`` heads of a layer.

Both kinds share the family ``sink_window``: a dense head is a window whose span is always ``N``.
A group whose heads are all dense runs transformers' own sdpa path, bit for bit; otherwise the
``sink_window`` op (``headwise.kernels.sink_window``) with each head's sink and span.
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ...kernels.sink_window import sink_window_attention
from ...plan import HeadSpec
from ..base import AttentionCall
from ..kv_rule import LayerRule


class SoftmaxKVGroup:
    """``window`` / ``dense`` heads of one layer: softmax over each head's sink + window."""

    family = "sink_window"
    state_key = None

    def __init__(self, layer_idx: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor] | None = None):
        self.layer_idx = layer_idx
        self.heads = tuple(heads)
        self.rule = LayerRule.from_heads(specs)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[B, Q, Hg * G, D]`` softmax attention; shapes in ``headwise.kinds.base.KindGroup``."""
        rule = self.rule.to(q.device)
        if rule.all_dense or call.dense_prefill:
            # dense prefill: every head reads all it has; the cache still keeps only the plan's KV
            return dense_attention(call.module, q, k, v, call.query_pos, call.key_pos, call.scale)
        span = rule.span(call.lengths)                                          # [B, Hg]
        out = sink_window_attention(q, k, v, call.query_pos, call.key_pos, rule.sink, span, call.scale,
                                    backend=call.backend)
        return out.transpose(1, 2).contiguous()


def dense_attention(module, query, key, value, q_pos, k_pos, scale) -> torch.Tensor:
    """A group whose heads are all dense runs transformers' own sdpa path, bit for bit.

    Positions become HF's boolean mask only when slots are not simply ``0..S-1`` (padding, or
    a cache that dropped padding slots). Returns ``[B, q, H, D]``; padding queries get zeros.
    """
    S, Q = key.shape[-2], query.shape[-2]
    slots = torch.arange(S, device=key.device)
    if bool((k_pos == slots).all()) and bool((q_pos == slots[S - Q:]).all()):
        mask = None
    else:
        mask = (k_pos[:, :, None, :] <= q_pos[:, None, :, None]) & (k_pos[:, :, None, :] >= 0)   # [B, Hk, Q, S]
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scale)
    return out.masked_fill((q_pos < 0)[:, :, None, None], 0.0)
