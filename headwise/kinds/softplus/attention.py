"""The ``softplus`` heads of one layer: the ``softplus`` op over each head's sink + window.

A group whose heads all compute plain softmax over everything (``exp``, temperature 1, no length
scale, no re-weighting, dense span) runs transformers' own sdpa path, so such a plan reproduces the
unpatched model bit for bit; every other group calls ``kernels.softplus``. The KV these heads read
is the cache's, kept by the heads' ``kv_rule`` (a window's rule), so they need no state of their own.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...kernels.softplus import HeadParams, softplus_attention
from ..base import HeadSpec
from ..call import AttentionCall
from ..kv_rule import LayerRule
from ..softmax import dense_attention


def head_params(specs) -> HeadParams:
    """The op's per-head parameters (``[Hg]`` tensors) of ``Softplus`` specs."""
    return HeadParams(
        softplus=torch.tensor([s.nonlinearity == "softplus" for s in specs], dtype=torch.bool),
        temperature=torch.tensor([s.temperature for s in specs], dtype=torch.float32),
        log_ref=torch.tensor([s.log_ref for s in specs], dtype=torch.float32),
        log_floor=torch.tensor([s.log_floor for s in specs], dtype=torch.float32),
        power=torch.tensor([s.power for s in specs], dtype=torch.float32))


class SoftplusGroup:
    """``softplus`` heads of one layer."""

    state_key = None

    def __init__(self, layer_idx: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor] | None = None):
        self.layer_idx = layer_idx
        self.heads = tuple(heads)
        self.rule = LayerRule.from_heads(specs)
        self.params = head_params(specs)
        dense_span = all(s.sink == 0 and s.alpha >= 0 and s.beta == 1.0 for s in specs)
        self.softmax = dense_span and bool(self.params.is_softmax().all())
        self._on: dict = {}

    def params_on(self, device: torch.device) -> HeadParams:
        if device not in self._on:
            self._on[device] = self.params.to(device)
        return self._on[device]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[B, Q, Hg * G, D]``; shapes in ``headwise.kinds.call.KindGroup``."""
        if self.softmax:                 # plain softmax over everything: transformers' own sdpa
            return dense_attention(call.module, q, k, v, call.query_pos, call.key_pos, call.scale)
        rule = self.rule.to(q.device)
        span = rule.span(call.lengths)                                          # [B, Hg]
        out = softplus_attention(q, k, v, call.query_pos, call.key_pos, rule.sink, span, call.scale,
                                 self.params_on(q.device), backend=call.backend)
        return out.transpose(1, 2).contiguous()
