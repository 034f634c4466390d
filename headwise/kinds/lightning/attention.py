"""The ``lightning`` heads of one layer: feature maps, the ``lightning`` op, normaliser, recurrent state.

Prefill and decode are one path: this forward's own keys/values are folded into the per-sequence
state ``S [B, Hg, F, D+1]`` (the last column accumulates ``phi(k)``, the normaliser) by
``headwise.kernels.lightning``; with ``T = 1`` that is the per-token state update. The state lives
in the cache under ``state_key`` (a dict of batch-first tensors), so the HF cache and an engine
hold it per sequence instead of KV blocks.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...kernels.lightning import lightning_attention
from ...plan import HeadSpec, PlanError
from ..base import AttentionCall
from ..window import dense_attention
from .feature_map import hedgehog_features

#: Added to the normaliser so an all-padding row divides by a positive number.
NORM_EPS = 1e-6


class LightningGroup:
    """``lightning`` heads of one layer (all with one ``feature_dim``)."""

    family = "lightning"
    state_key = "lightning"

    def __init__(self, layer_idx: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor]):
        dims = {s.feature_dim for s in specs}
        if len(dims) > 1:
            raise PlanError(f"layer {layer_idx}: lightning heads of one layer must share feature_dim, got {sorted(dims)}.")
        self.layer_idx = layer_idx
        self.heads = tuple(heads)
        self.feature_dim = dims.pop()
        self.q_weight = torch.cat([weights[f"{s.weights}.q"].float() for s in specs])      # [Hg * G, D, F/2]
        self.k_weight = torch.stack([weights[f"{s.weights}.k"].float() for s in specs])    # [Hg, D, F/2]
        self.log_decay = torch.tensor([s.log_decay for s in specs], dtype=torch.float32)   # [Hg]
        self._on: dict = {}

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-sequence state tensors (name -> shape without the batch dimension, dtype), so an
        engine can preallocate a pool of state slots: ``{"s": ((Hg, F, D + 1), float32)}``."""
        return {"s": ((len(self.heads), self.feature_dim, self.k_weight.shape[1] + 1), torch.float32)}

    def _params(self, device: torch.device):
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.q_weight, self.k_weight, self.log_decay))
        return self._on[device]

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor,
            state: torch.Tensor | None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Lightning attention of this forward's tokens, tensors only (HF path and engine).

        Args:
            q: ``[B, Hg * G, T, D]`` queries; k, v: ``[B, Hg, T, D]`` this forward's keys/values.
            query_pos: ``[B, T]`` int64, -1 at padding (padding neither reads nor enters the state).
            state: ``[B, Hg, F, D + 1]`` fp32 state before these tokens, or ``None`` (empty).

        Returns:
            ``(out [B, Hg * G, T, D]`` in ``q.dtype`` (zeros at padding), ``state [B, Hg, F, D + 1])``.
        """
        q_weight, k_weight, log_decay = self._params(q.device)
        valid = (query_pos >= 0)[:, None, :]                                        # [B, 1, T]
        q_feat = hedgehog_features(q, q_weight)
        k_feat = hedgehog_features(k, k_weight) * valid[..., None]
        values = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], dim=-1)
        g = torch.where(valid, log_decay[None, :, None], 0.0)                       # [B, Hg, T]
        num, state = lightning_attention(q_feat, k_feat, values, g, state, backend=backend)
        out = num[..., :-1] / (num[..., -1:] + NORM_EPS)
        out = out.masked_fill(~valid[..., None], 0.0)
        return out.to(q.dtype), state

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[B, Q, Hg * G, D]``; shapes in ``headwise.kinds.base.KindGroup``."""
        own_k, own_v = call.own_keys(k, v)
        previous = call.states.get(self.state_key) if call.states is not None else None
        out, state = self.run(q, own_k, own_v, call.query_pos, None if previous is None else previous["s"],
                              call.backend)
        if call.states is not None:
            call.states[self.state_key] = {"s": state}
        if call.dense_prefill:
            # dense prefill: the prompt reads everything with softmax; the state is still built
            return dense_attention(call.module, q, k, v, call.query_pos, call.key_pos, call.scale)
        return out.transpose(1, 2).contiguous()
