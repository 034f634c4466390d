"""How one KV head of one request keeps its KV in the engine's blocks (from its spec's ``kv_rule``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..kinds.base import HeadSpec
from ..kinds.rules import as_rule


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


def head_layout(spec: HeadSpec, n: int, block_size: int) -> HeadLayout:
    """The layout of ``spec``'s head for a request that will reach ``n`` tokens: its ``kv_rule``
    (sink + ``clamp(floor(alpha + beta*n), max(1, min_span), n)`` or everything), or no KV at all
    (``keeps_kv``)."""
    if not spec.keeps_kv:
        return NO_KV
    rule = as_rule(spec.kv_rule())
    if rule.dense:
        return softmax_layout(0, n, n, block_size)
    return softmax_layout(rule.sink, rule.span(n), n, block_size)
