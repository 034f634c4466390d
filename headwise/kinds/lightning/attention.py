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

from ...errors import PlanError
from ...kernels.lightning import lightning_attention, lightning_state
from ..base import HeadSpec
from ..call import AttentionCall
from ..hedgehog import hedgehog_features

#: Added to the normaliser so an all-padding row divides by a positive number.
NORM_EPS = 1e-6


class LightningGroup:
    """``lightning`` heads of one layer (all with one ``feature_dim``)."""

    state_key = "lightning"
    reads_cache = False

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
            key_pos: torch.Tensor | None, state: torch.Tensor | None, scale: float = 1.0,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Lightning attention of this forward's tokens, tensors only (``StatefulGroup.run``).

        Args:
            q: ``[B, Hg * G, T, D]`` queries; k, v: ``[B, Hg, T, D]`` this forward's keys/values.
            query_pos: ``[B, T]`` int64, -1 at padding (padding neither reads nor enters the state).
            key_pos, scale: unused (the keys are the queries' own tokens; linear attention has no scale).
            state: ``[B, Hg, F, D + 1]`` fp32 state before these tokens, or ``None`` (empty).

        Returns:
            ``(out [B, Hg * G, T, D]`` in ``q.dtype`` (zeros at padding), ``state [B, Hg, F, D + 1])``.
        """
        q_weight = self._params(q.device)[0]
        k_feat, values, g = self._key_side(k, v, query_pos)
        num, state = lightning_attention(hedgehog_features(q, q_weight), k_feat, values, g, state, backend=backend)
        out = num[..., :-1] / (num[..., -1:] + NORM_EPS)
        out = out.masked_fill((query_pos < 0)[:, None, :, None], 0.0)
        return out.to(q.dtype), state

    def fold_state(self, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor | None,
                   state: torch.Tensor | None) -> torch.Tensor:
        """The state ``run`` ends with, without its outputs (``lightning_state``: one matmul per head);
        shapes as ``run``. A dense prefill needs only this."""
        return lightning_state(*self._key_side(k, v, query_pos), state)

    def _key_side(self, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor):
        """``(k features [B, Hg, T, F]`` zero at padding, ``[v, 1] [B, Hg, T, D + 1]`` fp32,
        ``log decay [B, Hg, T])``."""
        _, k_weight, log_decay = self._params(k.device)
        valid = (query_pos >= 0)[:, None, :]                                        # [B, 1, T]
        k_feat = hedgehog_features(k, k_weight) * valid[..., None]
        values = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], dim=-1)
        return k_feat, values, torch.where(valid, log_decay[None, :, None], 0.0)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[B, Q, Hg * G, D]``; shapes in ``headwise.kinds.call.KindGroup``."""
        own_k, own_v = call.own_keys(k, v)
        out, state = self.run(q, own_k, own_v, call.query_pos, None, call.state_before(self.state_key),
                              backend=call.backend)
        if call.states is not None:
            call.states[self.state_key] = {"s": state}
        return out.transpose(1, 2).contiguous()

    def fold(self, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> None:
        """Fold this forward's own keys into ``call.states`` without computing outputs (shapes as
        ``attention``); nothing to do without a cache."""
        if call.states is not None:
            own_k, own_v = call.own_keys(k, v)
            state = self.fold_state(own_k, own_v, call.query_pos, None, call.state_before(self.state_key))
            call.states[self.state_key] = {"s": state}
