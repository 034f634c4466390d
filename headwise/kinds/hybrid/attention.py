"""The ``hybrid`` heads of one layer: exact sink + window softmax and a linear part over older keys,
one normaliser (``headwise.kernels.hybrid_window``), and the recurrent state of the keys that left.

How a forward runs, for queries at positions ``t`` (prefill chunk or one decode token):

1. **The key that leaves the window.** At query ``t`` the key at ``t - window`` stops being exact
   and joins the linear part. It is looked up by position among the keys the forward is given
   (the cache keeps one slot past the window for exactly this key, ``Hybrid.kv_rule``), so the
   sequence of *delayed keys* ``k_{t - window}`` runs alongside the queries (zero below the sink).
2. **Linear part** = ``headwise.kernels.lightning`` over the queries' features and the delayed
   keys' features: its state after query ``t`` holds every key ``sink <= s <= t - window`` with
   weight ``lambda^(t - window - s)``; the constant ``lambda^window`` restores ``lambda^(t - s)``.
   The per-query-head mixing factor ``mu`` multiplies it. With ``T = 1`` this is the per-token
   state update, so prefill and decode are one path.
3. **Exact part and combination**: ``hybrid_window_attention`` (softmax weights ``exp(a - m)``
   over the sink and the last ``window`` keys, one denominator with the linear part).

The state (``S [B, Hg, F, D + 1]`` fp32; the last column accumulates ``phi(k)``, the normaliser)
lives in the cache under ``state_key``, like a ``lightning`` head's.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import PlanError
from ...kernels.hybrid_window import hybrid_window_attention
from ...kernels.lightning import lightning_attention, lightning_state
from ..base import HeadSpec
from ..call import AttentionCall
from ..hedgehog import hedgehog_features


class HybridGroup:
    """``hybrid`` heads of one layer (all with one ``feature_dim``; sinks and windows may differ)."""

    state_key = "hybrid"
    reads_cache = True

    def __init__(self, layer_idx: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor]):
        dims = {s.feature_dim for s in specs}
        if len(dims) > 1:
            raise PlanError(f"layer {layer_idx}: hybrid heads of one layer must share feature_dim, got {sorted(dims)}.")
        self.layer_idx = layer_idx
        self.heads = tuple(heads)
        self.feature_dim = dims.pop()
        self.q_weight = torch.cat([weights[f"{s.weights}.q"].float() for s in specs])               # [Hg * G, D, F/2]
        self.k_weight = torch.stack([weights[f"{s.weights}.k"].float() for s in specs])             # [Hg, D, F/2]
        self.log_mix = torch.cat([weights[f"{s.weights}.log_mix"].float() for s in specs])          # [Hg * G]
        self.log_decay = torch.tensor([s.log_decay for s in specs], dtype=torch.float32)            # [Hg]
        self.sink = torch.tensor([s.sink for s in specs], dtype=torch.long)                         # [Hg]
        self.window = torch.tensor([s.window for s in specs], dtype=torch.long)                     # [Hg]
        G = self.q_weight.shape[0] // len(specs)
        # mu * lambda^window per query head: the linear part's weight once the delay is undone
        self.linear_weight = (self.log_mix + (self.window * self.log_decay).repeat_interleave(G)).exp()
        self._on: dict = {}

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-sequence state tensors (name -> shape without the batch dimension, dtype):
        ``{"s": ((Hg, F, D + 1), float32)}``."""
        return {"s": ((len(self.heads), self.feature_dim, self.k_weight.shape[1] + 1), torch.float32)}

    def _params(self, device: torch.device):
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.q_weight, self.k_weight, self.log_decay,
                                                            self.linear_weight, self.sink, self.window))
        return self._on[device]

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor,
            state: torch.Tensor | None, scale: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Hybrid attention of this forward's queries, tensors only (HF path and engine).

        Args:
            q: ``[B, Hg * G, Q, D]`` queries (post-RoPE).
            k, v: ``[B, Hg, S, D]`` every key/value slot the queries may need, in any slot order:
                the sink, the last ``window`` keys of every query and the key at ``t - window``.
            query_pos: ``[B, Q]`` int64, -1 at padding; key_pos: ``[B, Hk, S]`` int64 (``Hk`` 1 or
                ``Hg``), -1 for empty slots.
            state: ``[B, Hg, F, D + 1]`` fp32 state before these queries (keys up to the first query's
                position minus ``window + 1``), or ``None`` (empty).
            scale: softmax scale; backend: kernel backend.

        Returns:
            ``(out [B, Hg * G, Q, D]`` in ``q.dtype`` (zeros at padding), ``state [B, Hg, F, D + 1])``.

        Raises:
            RuntimeError: a key that leaves the window in this forward is not among ``k``.
        """
        q_weight, _, _, linear_weight, sink, window = self._params(q.device)
        k_feat, values, g = self._leaving_keys(k, v, query_pos, key_pos)
        num, state = lightning_attention(hedgehog_features(q, q_weight), k_feat, values, g, state, backend=backend)
        num = num * linear_weight[None, :, None, None]
        span = window[None].expand(k.shape[0], -1)
        out = hybrid_window_attention(q, k, v, query_pos, key_pos, sink, span, scale, num[..., :-1], num[..., -1],
                                      backend=backend)
        return out, state

    def fold_state(self, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor,
                   state: torch.Tensor | None) -> torch.Tensor:
        """The state ``run`` ends with, without its outputs (``lightning_state``: one matmul per head);
        shapes and errors as ``run``. A dense prefill needs only this."""
        return lightning_state(*self._leaving_keys(k, v, query_pos, key_pos), state)

    def _leaving_keys(self, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor):
        """The key that leaves the window at each query, as the linear part's input: ``(features
        [B, Hg, Q, F]`` zero where none leaves, ``[v, 1] [B, Hg, Q, D + 1]`` fp32, ``log decay [B, Hg, Q])``."""
        _, k_weight, log_decay, _, sink, window = self._params(k.device)
        B, Hg, S, D = k.shape
        real = query_pos >= 0                                                        # [B, Q]
        leaving = query_pos[:, None, :] - window[None, :, None]                      # [B, Hg, Q]
        fold = real[:, None, :] & (leaving >= sink[None, :, None])
        slot, found = _slots_of(key_pos.expand(B, Hg, S), leaving)
        if bool((fold & ~found).any()):
            raise RuntimeError(f"layer {self.layer_idx}: a hybrid head's key that leaves the window was not among the "
                               "keys given to attention; the cache must keep window + 1 recent keys (Hybrid.kv_rule).")
        index = slot[..., None].expand(B, Hg, slot.shape[-1], D)
        v_old = v.gather(2, index).float()
        k_feat = hedgehog_features(k.gather(2, index), k_weight) * fold[..., None]
        values = torch.cat([v_old, torch.ones_like(v_old[..., :1])], dim=-1)
        return k_feat, values, torch.where(real[:, None, :], log_decay[None, :, None], 0.0)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[B, Q, Hg * G, D]``; shapes in ``headwise.kinds.call.KindGroup``."""
        out, state = self.run(q, k, v, call.query_pos, call.key_pos, call.state_before(self.state_key), call.scale,
                              call.backend)
        if call.states is not None:
            call.states[self.state_key] = {"s": state}
        return out.transpose(1, 2).contiguous()

    def fold(self, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> None:
        """Fold the keys that leave the window in this forward into ``call.states`` without computing
        outputs (shapes as ``attention``); nothing to do without a cache."""
        if call.states is not None:
            call.states[self.state_key] = {"s": self.fold_state(k, v, call.query_pos, call.key_pos,
                                                                call.state_before(self.state_key))}


def _slots_of(key_pos: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot of each wanted position: ``key_pos [B, H, S]``, ``wanted [B, H, Q]`` -> ``(slot, found)``
    ``[B, H, Q]`` (``slot`` is 0 where not found). Positions are unique per row (a cache keeps one slot
    per position); slots in any order (sorted once, or read as they are when already in order)."""
    S = key_pos.shape[-1]
    if S == 0:
        zeros = torch.zeros_like(wanted)
        return zeros, zeros.bool()
    if bool((key_pos[..., 1:] >= key_pos[..., :-1]).all()):
        ordered, order = key_pos.contiguous(), None
    else:
        ordered, order = torch.sort(key_pos, dim=-1)
    at = torch.searchsorted(ordered, wanted.contiguous()).clamp(max=S - 1)
    found = (ordered.gather(-1, at) == wanted) & (wanted >= 0)
    slot = at if order is None else order.gather(-1, at)
    return torch.where(found, slot, 0), found
