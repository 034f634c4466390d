"""The interface between a layer and the head kinds it runs.

A **group** is the heads of one layer whose specs share a ``family``; the family's factory
(``register_family``) builds it once per layer from those specs and the plan's fitted tensors::

    group = FAMILIES[spec.family](layer_idx, heads, specs, weights)

and every forward calls ``group.attention(q, k, v, call)`` with the group's slice of the layer's
query heads and KV heads. ``AttentionCall`` carries what is the same for every group of the
forward (positions, span lengths, scale, backend, the cache's decode states).

Decode state: a softmax kind's state is the KV the cache keeps for its heads, described per head
by ``HeadSpec.kv_rule()``; any other state (a recurrent state) is a dict of tensors whose first
dimension is the batch, stored by the runtime in ``call.states[group.state_key]`` — the HF cache
layer, and later the engine, reorder / select / count it without knowing the kind.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Protocol

import torch

from ..plan import HeadSpec


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


class KindGroup(Protocol):
    """The heads of one layer that share a family. See the module docstring."""

    family: str
    heads: tuple[int, ...]
    #: key of this group's recurrent state in ``AttentionCall.states`` (``None``: KV only)
    state_key: str | None

    # A group with ``state_key`` set also has ``state_spec() -> {name: (shape without batch, dtype)}``
    # (the per-sequence tensors an engine allocates as state slots), a tensor-only
    # ``run(q, k, v, query_pos, ..., state, ...) -> (out, state)`` for callers outside HF,
    # ``fold_state(k, v, query_pos, ..., state) -> state`` (the same state without outputs: what a
    # dense prefill needs) and ``fold(k, v, call)``, which folds a forward's keys into ``call.states``.

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """Attention of the group's heads.

        Args:
            q: ``[B, Hg * G, Q, D]`` queries of the group's query heads (post-RoPE).
            k, v: ``[B, Hg, S, D]`` every key/value slot the cache returned for the group's KV heads.
            call: the forward, restricted to the group's heads.

        Returns:
            ``[B, Q, Hg * G, D]`` in ``q.dtype`` (the HF attention-interface layout); padding queries 0.
        """
        ...


#: family -> factory(layer_idx, heads, specs, weights) -> KindGroup
GroupFactory = Callable[[int, tuple[int, ...], tuple[HeadSpec, ...], Mapping[str, torch.Tensor]], KindGroup]
FAMILIES: dict[str, GroupFactory] = {}


def register_family(family: str, factory: GroupFactory) -> None:
    """Register the group factory of a family (called by a kind folder's ``__init__``)."""
    if family in FAMILIES and FAMILIES[family] is not factory:
        raise ValueError(f"head family {family!r} is registered twice; give each family one group factory.")
    FAMILIES[family] = factory


def group_factory(spec: HeadSpec, where: str) -> GroupFactory:
    """The group factory of ``spec``'s family; one sentence when no kind implements it."""
    from ..plan import PlanError

    factory = FAMILIES.get(spec.family)
    if factory is None:
        raise PlanError(f"{where}: head kind {spec.kind!r} has no attention implementation in this version of "
                        f"headwise (families with one: {sorted(FAMILIES)}).")
    return factory
