"""The ``moh`` heads of one layer: the router, routed attention over the kept KV, mean outputs for routed-out heads.

Per token, the router scores every query head of the pool (the layer's ``moh`` heads) from the
RoPE-invariant pair magnitudes of the pool's queries, and the ``top_k`` best run; the others do no
attention work (``headwise.kernels.routed_attention``) and output their fitted mean. With
``top_k`` equal to the pool's query heads nothing is routed: the group runs the shared softmax path
(``headwise.kinds.softmax``), so such a plan equals the plan with plain softmax heads exactly.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import PlanError
from ...kernels.routed_attention import routed_attention
from ..base import HeadSpec
from ..call import AttentionCall, query_heads
from ..kv_rule import LayerRule
from ..softmax import softmax_attention


def pair_magnitudes(q: torch.Tensor) -> torch.Tensor:
    """Router features: ``q [B, H, Q, D]`` -> ``[B, Q, H * D/2]`` fp32, ``sqrt(q_i^2 + q_{i+D/2}^2)``.

    RoPE (``rotate_half`` layout) rotates each pair ``(i, i + D/2)`` by a position-dependent angle,
    so these magnitudes are the same before and after it: the router sees what the query asks
    for, not where it sits. Feature ``h * D/2 + i`` is pair ``i`` of query head ``h``.
    """
    B, H, Q, D = q.shape
    qf = q.float()
    half = D // 2
    mag = torch.sqrt(qf[..., :half] ** 2 + qf[..., half:2 * half] ** 2)           # [B, H, Q, D/2]
    return mag.permute(0, 2, 1, 3).reshape(B, Q, H * half)


class MoHGroup:
    """``moh`` heads of one layer (the routed pool; all with one ``top_k``)."""

    state_key = None

    def __init__(self, layer_idx: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor]):
        tops = {s.top_k for s in specs}
        if len(tops) > 1:
            raise PlanError(f"layer {layer_idx}: the moh heads of one layer must state the same top_k (the layer's "
                            f"routed query heads per token), got {sorted(tops)}.")
        fills = [weights[f"{s.weights}.fill"].float() for s in specs]
        G = fills[0].shape[0]
        pool = query_heads(heads, G)                                 # the layer's query heads in the pool
        self.layer_idx = layer_idx
        self.heads = tuple(heads)
        self.group_size = G
        self.top_k = tops.pop()
        if self.top_k > len(pool):
            raise PlanError(f"layer {layer_idx}: top_k {self.top_k} is more than the {len(pool)} query heads of the "
                            f"layer's moh heads; use at most {len(pool)}.")
        self.routes = self.top_k < len(pool)
        self.router = torch.cat([weights[f"{s.weights}.router"].float()[:, pool] for s in specs])   # [Hq*D/2, Hq]
        self.bias = torch.cat([weights[f"{s.weights}.bias"].float() for s in specs])                # [Hq]
        self.fill = torch.cat(fills)                                                                 # [Hq, D]
        self.rule = LayerRule.from_heads(specs)
        self._on: dict = {}

    def _params(self, device: torch.device):
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.router, self.bias, self.fill))
        return self._on[device]

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """Router scores ``[B, Q, Hq]`` fp32 of the pool's queries ``q [B, Hq, Q, D]`` (higher: run it)."""
        router, bias, _ = self._params(q.device)
        return pair_magnitudes(q) @ router + bias

    def route(self, q: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Which pairs run: ``q [B, Hq, Q, D]``, ``query_pos [B, Q]`` -> ``[B, Hq, Q]`` bool, ``top_k``
        query heads per real token (every head when the group does not route), none at padding."""
        B, Hq, Q, _ = q.shape
        valid = (query_pos >= 0)[:, None, :]
        if not self.routes:
            return valid.expand(B, Hq, Q)
        scores = self.scores(q)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(self.top_k, dim=-1).indices, True)
        return chosen.transpose(1, 2) & valid

    def fill_routed_out(self, out: torch.Tensor, active: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """``out [B, Hq, Q, D]`` with every routed-out pair of a real token set to its head's mean output."""
        _, _, fill = self._params(out.device)
        routed_out = ~active & (query_pos >= 0)[:, None, :]
        return torch.where(routed_out[..., None], fill[None, :, None, :].to(out.dtype), out)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[B, Q, Hq, D]``; shapes in ``headwise.kinds.call.KindGroup``."""
        if not self.routes:
            return softmax_attention(self.rule, q, k, v, call)
        rule = self.rule.to(q.device)
        active = self.route(q, call.query_pos)
        out = routed_attention(q, k, v, call.query_pos, call.key_pos, rule.sink, rule.span(call.lengths), call.scale,
                               active, backend=call.backend)
        return self.fill_routed_out(out, active, call.query_pos).transpose(1, 2).contiguous()
