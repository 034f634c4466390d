"""Softmax attention over the KV a head keeps: the shared group of every softmax-over-kept-KV kind.

``window`` and ``dense`` heads run this group (a dense head is a window whose span is always
``N``); kinds with their own attention fall back to it when they compute plain softmax (``moh``
that does not route, ``softplus`` with softmax parameters). A group whose heads are all dense runs
transformers' own sdpa path, bit for bit; otherwise the ``sink_window`` op
(``headwise.kernels.sink_window``) with each head's sink and span.
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..kernels.sink_window import sink_window_attention
from .base import HeadSpec
from .call import AttentionCall
from .kv_rule import LayerRule


class SoftmaxKVGroup:
    """Softmax heads of one layer over each head's sink + window (or everything)."""

    state_key = None

    def __init__(self, layer_idx: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor] | None = None):
        self.layer_idx = layer_idx
        self.heads = tuple(heads)
        self.rule = LayerRule.from_heads(specs)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[B, Q, Hg * G, D]`` softmax attention; shapes in ``headwise.kinds.call.KindGroup``."""
        return softmax_attention(self.rule, q, k, v, call)


def softmax_attention(rule: LayerRule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      call: AttentionCall) -> torch.Tensor:
    """Softmax over each head's kept KV (``rule``, the heads of ``q``/``k``): ``[B, Q, Hg * G, D]``."""
    rule = rule.to(q.device)
    if rule.all_dense:
        return dense_attention(call.module, q, k, v, call.query_pos, call.key_pos, call.scale)
    span = rule.span(call.lengths)                                          # [B, Hg]
    out = sink_window_attention(q, k, v, call.query_pos, call.key_pos, rule.sink, span, call.scale,
                                backend=call.backend)
    return out.transpose(1, 2).contiguous()


def dense_attention(module, query, key, value, q_pos, k_pos, scale) -> torch.Tensor:
    """Every head dense through transformers' own sdpa path, bit for bit.

    Positions become HF's boolean mask only when slots are not simply ``0..S-1`` (padding, or
    a cache that dropped padding slots). ``query [B, H, Q, D]``, ``key/value [B, Hkv, S, D]``,
    ``q_pos [B, Q]``, ``k_pos [B, Hk, S]`` -> ``[B, Q, H, D]``; padding queries get zeros.
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
