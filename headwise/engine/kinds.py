"""Head kinds as the engine sees them: how a head uses KV blocks, and how its attention runs.

Every plan head kind the engine can run maps to one ``EngineKind``. The kind folder says which:
``headwise/kinds/<kind>/engine.py`` defines ``ENGINE_KIND`` (one of the building blocks below, or its
own class), and ``engine_kind(spec)`` imports it on first use, so a new kind plugs into the engine
with a file in its own folder. A kind answers two questions:

* ``layout(spec, n, block_size)``: for a request that will reach ``n`` tokens, the head's sink,
  span, and the block layout of its KV (``HeadLayout``);
* ``bind(layer, heads, specs, weights)``: the object that runs the heads of one layer that use it
  (a *group*): ``prefill`` / ``decode``, reading and writing the paged pool (or the group's own
  per-sequence state) through ``LayerStep``.

A layer groups its heads by kind, runs each group and scatters the outputs back into head order
(``runner.layer_attention``). ``window`` and ``dense`` are one softmax-over-kept-KV kind
(``SoftmaxKV``); ``lightning`` heads keep no KV, only a per-sequence recurrent state, and run the
kind folder's own group (``headwise.kinds.lightning``) through ``LinearState``. A new kind adds
``engine.py`` to its folder and nothing in the engine changes.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..kernels.paged_decode import paged_decode
from ..kernels.paged_decode.naive import gather_pages
from ..kernels.sink_window import sink_window_attention
from ..kinds.base import group_factory
from ..plan import Dense, HeadSpec, Window

if TYPE_CHECKING:
    from .runner import LayerStep


@dataclass(frozen=True)
class HeadLayout:
    """How one KV head of one request keeps its KV in blocks.

    Position ``p`` lives at logical slot ``p`` when ``p < sink``, else at
    ``sink_slots + (p - sink) mod ring`` (no wrap when ``ring == 0``); logical slot ``l`` is block
    ``l // block_size`` of the head's table, offset ``l % block_size``.

    sink, span: the attention rule (a query at ``q`` reads keys ``k < sink`` or ``k > q - span``).
    sink_slots: slots reserved for the sink (``sink`` rounded up to whole blocks).
    ring: window slots (``span`` rounded up to whole blocks), 0 when the head keeps everything.
    max_blocks: blocks the head holds at most (at length ``n``).
    keeps_kv: False for a head that keeps no KV in the pool (a recurrent-state kind).
    """

    sink: int
    span: int
    sink_slots: int
    ring: int
    max_blocks: int
    keeps_kv: bool = True


#: The layout of a head that keeps no KV blocks.
NO_KV = HeadLayout(sink=0, span=0, sink_slots=0, ring=0, max_blocks=0, keeps_kv=False)


def softmax_layout(sink: int, span: int, n: int, block_size: int) -> HeadLayout:
    """Layout of a head that keeps its sink and a ring of at least ``span`` slots."""
    sink = min(sink, n)
    sink_slots = math.ceil(sink / block_size) * block_size
    ring = math.ceil(span / block_size) * block_size
    if sink + span >= n or ring >= n - sink:
        ring = 0                                    # keeps every token: no ring needed
    if n <= sink:
        last = n - 1
    else:
        last = sink_slots + (min(n - sink, ring) if ring else n - sink) - 1
    return HeadLayout(sink=sink, span=span, sink_slots=sink_slots, ring=ring, max_blocks=last // block_size + 1)


class EngineKind(Protocol):
    """What the engine needs from a head kind (see the module docstring)."""

    name: str

    def layout(self, spec: HeadSpec, n: int, block_size: int) -> HeadLayout: ...

    def bind(self, layer: int, heads: list[int], specs: list[HeadSpec], weights) -> "EngineGroup": ...


class EngineGroup(Protocol):
    """The heads of one layer that one ``EngineKind`` runs."""

    def prefill(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor: ...

    def decode(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor: ...


class SoftmaxKV:
    """``window`` and ``dense`` heads: softmax attention over the sink + window kept in the pool."""

    name = "softmax_kv"

    def layout(self, spec: HeadSpec, n: int, block_size: int) -> HeadLayout:
        if isinstance(spec, Dense):
            return softmax_layout(0, n, n, block_size)
        assert isinstance(spec, Window)
        return softmax_layout(spec.sink, spec.span(n), n, block_size)

    def bind(self, layer: int, heads: list[int], specs: list[HeadSpec], weights) -> "SoftmaxKV":
        return self                      # stateless: the pool and the step carry everything

    def prefill(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """One sequence's prefill chunk.

        Args:
            q: ``[1, Hg * G, n, D]`` the chunk's queries of this group's heads; k, v: ``[1, Hg, n, D]``
                the chunk's keys/values (not yet in the pool).

        Returns:
            ``[1, Hg * G, n, D]``.
        """
        seq = step.prefill_seq
        sink, span = seq.sink[step.layer, heads].to(q.device), seq.span[step.layer, heads].to(q.device)
        q_pos = step.prefill_pos[None]                                             # [1, n]
        if step.dense_prefill:              # every head reads all it has; the pool keeps the plan's KV
            sink, span = torch.zeros_like(sink), torch.full_like(span, int(step.prefill_pos[-1]) + 1)
        cached = step.cached_kv(heads)
        if cached is not None:
            ck, cv, cpos = cached                                                  # [1, Hg, C, D], [1, Hg, C]
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            k_pos = torch.cat([cpos, q_pos[:, None].expand(1, len(heads), -1)], dim=-1)
        else:
            k_pos = q_pos[:, None]
        return sink_window_attention(q, k, v, q_pos, k_pos, sink, span[None], step.scale, backend=step.backend)

    def decode(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Decode tokens of the step: ``q [Bd, Hg * G, D]`` -> ``[Bd, Hg * G, D]``; ``k, v [Bd, Hg, D]``
        are already written to the pool, so only ``q`` is read."""
        tables, sink, span = decode_rule(step, heads)
        return paged_decode(q, step.k_pool, step.v_pool, step.pos_pool, tables, step.decode_pos, sink, span,
                            step.scale, backend=step.backend)


class LinearState:
    """Heads that keep a recurrent state instead of KV (``lightning``).

    ``bind`` builds the kind folder's own group (fitted feature maps from the plan's weights) and
    wraps it: every request keeps its group state in ``Sequence.states[(layer, first head)]``
    (``[Hg, F, D + 1]`` fp32, constant in length); a prefill chunk continues it (a fresh or
    recomputed request starts empty) and a decode step stacks the batch's states, runs one
    per-token update and puts them back.
    """

    name = "linear_state"

    def layout(self, spec: HeadSpec, n: int, block_size: int) -> HeadLayout:
        return NO_KV

    def bind(self, layer: int, heads: list[int], specs: list[HeadSpec], weights) -> "LinearStateGroup":
        group = group_factory(specs[0], f"layer {layer}")(layer, tuple(heads), tuple(specs), weights)
        return LinearStateGroup(group, (layer, heads[0]))


class LinearStateGroup:
    """One layer's recurrent-state heads in the engine (see ``LinearState``)."""

    def __init__(self, group, key: tuple[int, int]):
        self.group = group
        self.key = key

    def prefill(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """``q [1, Hg * G, n, D]``, ``k, v [1, Hg, n, D]`` (the chunk's own tokens) -> ``[1, Hg * G, n, D]``."""
        seq = step.prefill_seq
        state = seq.states.get(self.key) if seq.num_computed > 0 else None
        state = None if state is None else state[None]
        if step.dense_prefill:           # the prompt reads everything with softmax; the state is still built
            seq.states[self.key] = self.group.fold_state(k, v, step.prefill_pos[None], state)[0]
            n = q.shape[2]
            zeros = torch.zeros(len(heads), dtype=torch.long, device=q.device)
            return sink_window_attention(q, k, v, step.prefill_pos[None], step.prefill_pos[None, None], zeros,
                                         torch.full((1, len(heads)), n, dtype=torch.long, device=q.device),
                                         step.scale, backend=step.backend)
        out, new = self.group.run(q, k, v, step.prefill_pos[None], state, step.backend)
        seq.states[self.key] = new[0]
        return out

    def decode(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """``q [Bd, Hg * G, D]``, ``k, v [Bd, Hg, D]`` -> ``[Bd, Hg * G, D]``; each request's state advances one token."""
        seqs = step.plan.decode_seqs
        states = torch.stack([seq.states[self.key] for seq in seqs])                  # [Bd, Hg, F, D + 1]
        out, new = self.group.run(q[:, :, None], k[:, :, None], v[:, :, None], step.decode_pos[:, None], states,
                                  step.backend)
        for seq, state in zip(seqs, new.unbind(0)):
            seq.states[self.key] = state
        return out[:, :, 0]


SOFTMAX_KV = SoftmaxKV()
LINEAR_STATE = LinearState()

#: Plan head kind name -> the engine kind that runs it (filled from the kind folders' ``engine.py``).
ENGINE_KINDS: dict[str, EngineKind] = {}


def decode_rule(step: "LayerStep", heads: list[int]):
    """``(tables [Bd, Hg, M], sink [Hg], span [Bd, Hg])`` of ``heads`` for the step's decode tokens."""
    if len(heads) == step.decode_sink.shape[0]:          # the layer's heads are all this kind
        return step.decode_tables, step.decode_sink, step.decode_span
    return step.decode_tables[:, heads], step.decode_sink[heads], step.decode_span[:, heads]


def decode_pages(step: "LayerStep", heads: list[int]):
    """The KV of ``heads`` for the step's decode tokens, gathered as a dense cache.

    The step's block tables are as wide as the layer's widest head (a dense head at 8k: 128
    blocks of 64); a sink + ring head holds only its first few, so the table is cut to the most
    blocks any of ``heads`` holds in any decode sequence (``Sequence.nblocks``, as the prefill
    gather of cached KV does) before gathering; otherwise every decode step would copy the widest
    head's context for each of these heads.

    Returns:
        ``(keys, values, key_pos, sink, span)``: ``[Bd, Hg, C, D]`` twice, ``[Bd, Hg, C]`` int64
        (-1 for empty slots), ``sink [Hg]`` and ``span [Bd, Hg]``.
    """
    tables, sink, span = decode_rule(step, heads)
    width = max(int(seq.nblocks[step.layer, heads].max()) for seq in step.plan.decode_seqs)
    keys, values, key_pos = gather_pages(step.k_pool, step.v_pool, step.pos_pool, tables[..., :width])
    return keys, values, key_pos, sink, span


def engine_kind(spec: HeadSpec) -> EngineKind:
    """The engine kind of a plan head, from its kind folder's ``engine.py`` (``ENGINE_KIND``); one clear
    sentence when the folder has none."""
    kind = ENGINE_KINDS.get(spec.kind)
    if kind is None:
        package = type(spec).__module__.rpartition(".")[0]          # headwise.kinds.<kind>
        try:
            module = importlib.import_module(f"{package}.engine")
        except ModuleNotFoundError as error:
            if error.name is None or not f"{package}.engine".startswith(error.name):
                raise                                                # a missing import inside engine.py
            raise ValueError(f"the engine cannot run {spec.kind!r} heads yet (its kind folder {package} has no "
                             "engine.py); use patch_model for this plan or remove those heads.") from None
        kind = ENGINE_KINDS[spec.kind] = module.ENGINE_KIND
    return kind
