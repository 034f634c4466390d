"""The runtime contract between a layer and the head kinds it runs.

A **group** is the heads of one layer whose kinds name the same attention target
(``Kind.attention``); the target is a factory that builds the group once per layer::

    group = factory(layer_idx, heads, specs, weights)

and every ``patch_model`` forward calls ``group.attention(q, k, v, call)`` with the group's slice of
the layer's query heads and KV heads. ``AttentionCall`` carries what is the same for every group
of the forward (positions, span lengths, scale, backend, the cache's decode states).

Decode state: a softmax kind's state is the KV the cache keeps for its heads (``HeadSpec.kv_rule``);
a kind with another state (a recurrent state) is a ``StatefulGroup``: its state is a dict of
batch-first tensors stored by the runtime in ``call.states[group.state_key]``, which the HF cache
layer and the engine hold, reorder and count without knowing the kind.

The engine runs its own groups (``Kind.engine``, same factory signature) through ``EngineGroup``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from ..engine.step import LayerStep
    from .base import HeadSpec


@dataclass
class AttentionCall:
    """One layer forward, as every group of the layer sees it.

    module: the HF attention module (``layer_idx``, ``config``) or ``None`` outside HF.
    query_pos: ``[B, Q]`` int64 real position of each query, -1 for padding.
    key_pos: ``[B, Hk, S]`` int64 position of every key slot passed to the layer (-1 empty);
        ``Hk`` is 1 (shared) or the layer's KV heads.
    lengths: ``[B]`` int64 the ``N`` span rules use (target length when set, else real length).
    scale: softmax scale.
    backend: kernel backend name ("auto", "naive", "cpu", "triton").
    dense_prefill: this forward has more than one query and the plan prefills dense.
    new_keys, new_values: ``[B, Hkv, Q, D]`` this forward's own keys/values (what a recurrent
        kind folds into its state), ``None`` when the passed keys are exactly those.
    states: the cache's per-group decode states (dict of batch-first tensors), ``None`` when the
        forward runs without a cache (the state starts empty and is dropped).
    """

    module: torch.nn.Module | None
    query_pos: torch.Tensor
    key_pos: torch.Tensor
    lengths: torch.Tensor
    scale: float
    backend: str = "auto"
    dense_prefill: bool = False
    new_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None
    states: dict | None = None

    def for_heads(self, heads: list[int], num_kv_heads: int) -> "AttentionCall":
        """The call restricted to KV heads ``heads`` of a layer with ``num_kv_heads`` heads."""
        index = torch.tensor(heads, device=self.key_pos.device)
        key_pos = self.key_pos if self.key_pos.shape[1] == 1 else self.key_pos.index_select(1, index)
        sub = lambda t: None if t is None else t.index_select(1, index.to(t.device))   # noqa: E731
        return replace(self, key_pos=key_pos, new_keys=sub(self.new_keys), new_values=sub(self.new_values))

    def state_before(self, state_key: str) -> torch.Tensor | None:
        """The recurrent state ``s`` a group (``state_key``) held before this forward; ``None`` when it
        is empty or the forward runs without a cache."""
        previous = self.states.get(state_key) if self.states is not None else None
        return None if previous is None else previous["s"]

    def own_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, Hg, Q, D]`` keys/values of this forward's own tokens (from ``new_keys`` or ``k, v``)."""
        if self.new_keys is not None:
            return self.new_keys, self.new_values
        Q = self.query_pos.shape[1]
        return k[:, :, -Q:], v[:, :, -Q:]


def query_heads(kv_heads: list[int] | tuple[int, ...], group_size: int) -> list[int]:
    """The query heads of KV heads ``kv_heads`` when every KV head serves ``group_size`` query heads (GQA)."""
    return [h * group_size + g for h in kv_heads for g in range(group_size)]


@runtime_checkable
class KindGroup(Protocol):
    """The heads of one layer that run one attention target (see the module docstring)."""

    heads: tuple[int, ...]
    #: key of this group's recurrent state in ``AttentionCall.states`` (``None``: KV only)
    state_key: str | None

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """Attention of the group's heads (forwards with ``call.dense_prefill`` never reach it: the
        layer runs those dense and calls ``fold`` on stateful groups).

        Args:
            q: ``[B, Hg * G, Q, D]`` queries of the group's query heads (post-RoPE).
            k, v: ``[B, Hg, S, D]`` every key/value slot the cache returned for the group's KV heads.
            call: the forward, restricted to the group's heads.

        Returns:
            ``[B, Q, Hg * G, D]`` in ``q.dtype`` (the HF attention-interface layout); padding queries 0.
        """
        ...


@runtime_checkable
class StatefulGroup(KindGroup, Protocol):
    """A group that keeps a recurrent state besides (or instead of) KV."""

    state_key: str
    #: ``run`` needs the keys the cache kept (a window beside the state); False: only this forward's own
    reads_cache: bool

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-sequence state tensors: name -> (shape without the batch dimension, dtype)."""
        ...

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor,
            key_pos: torch.Tensor, state: torch.Tensor | None, scale: float,
            backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor-only attention (HF path and engine).

        Args:
            q: ``[B, Hg * G, Q, D]``; k, v: ``[B, Hg, S, D]``: this forward's own keys (``S = Q``,
                in query order) when ``reads_cache`` is False, else every slot the queries may need.
            query_pos: ``[B, Q]`` int64, -1 at padding; key_pos: ``[B, Hk, S]`` int64 (``Hk`` 1 or ``Hg``).
            state: ``[B, ...]`` the state before these queries, or ``None`` (empty).

        Returns:
            ``(out [B, Hg * G, Q, D]`` in ``q.dtype``, zeros at padding; ``state [B, ...])``.
        """
        ...

    def fold_state(self, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, key_pos: torch.Tensor,
                   state: torch.Tensor | None) -> torch.Tensor:
        """The state ``run`` ends with, without its outputs (what a dense prefill needs); shapes as ``run``."""
        ...

    def fold(self, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> None:
        """Fold a forward's keys into ``call.states`` without outputs; nothing without a cache."""
        ...


class EngineGroup(Protocol):
    """The heads of one layer that one engine group runs (``Kind.engine``)."""

    def prefill(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """One sequence's prefill chunk (sparse prefill: dense prefill runs in the layer).

        Args:
            q: ``[1, Hg * G, n, D]`` the chunk's queries of the group's heads; k, v: ``[1, Hg, n, D]``
                the chunk's own keys/values (``step.prefill_keys`` adds what the pool holds).

        Returns:
            ``[1, Hg * G, n, D]``.
        """
        ...

    def decode(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """The step's decode tokens: ``q [Bd, Hg * G, D]`` -> ``[Bd, Hg * G, D]``; ``k, v [Bd, Hg, D]``
        are already in the pool (heads that keep KV)."""
        ...


#: factory(layer_idx, heads, specs, weights) -> KindGroup (or EngineGroup for ``Kind.engine``)
GroupFactory = Callable[[int, tuple[int, ...], tuple["HeadSpec", ...], Mapping[str, torch.Tensor]], object]
