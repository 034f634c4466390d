"""Budgeted head selection: which heads a fit converts, or how many heads each layer runs.

Every fitter that chooses heads under a budget goes through here:

- ``select``: heads ranked by a score (lowest or highest first, ties by ``(layer, head)``), cut at a
  count and at a bound: lightning/hybrid heads by held-out error, softplus heads by entropy gain,
  the calibrator's long heads by gate;
- ``budget_count``: the count a fraction of all heads allows ("at most that fraction");
- ``head_mask``: the chosen heads as a ``[layers, heads]`` mask;
- ``allocate``: heads per layer under a total, minimising a per-layer cost (MoH's query heads).

The calibrator's span choice (one candidate per head under a KV budget at every length) is a
MILP of its own (``optimize.py``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

Head = tuple[int, int]


def budget_count(fraction: float, total: int) -> int:
    """Heads that ``fraction`` of ``total`` allows: ``floor(fraction * total)`` (never more than the
    fraction; a float error of ``1e-9`` below an integer still counts as it)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a head budget must be a fraction in [0, 1], got {fraction}.")
    return int(math.floor(fraction * total + 1e-9))


def _descending(score):
    return tuple(-x for x in score) if isinstance(score, tuple) else -score


def ranked(scores: Mapping[Head, float | tuple], *, highest: bool = False) -> list[Head]:
    """Heads best first: lowest score first (``highest``: highest first), ties by ``(layer, head)``.
    A score may be a tuple (compared element by element: later elements break ties)."""
    return sorted(scores, key=lambda h: (_descending(scores[h]) if highest else scores[h], h))


def select(scores: Mapping[Head, float | tuple], *, count: int | None = None, highest: bool = False,
           bound: float | None = None) -> list[Head]:
    """The best heads by ``ranked``, at most ``count`` of them (``None``: no limit), leaving out heads
    past ``bound`` (lowest-first: scores above it; highest-first: scores not above it).

    Returns:
        Heads in rank order.
    """
    order = ranked(scores, highest=highest)
    if bound is not None:
        order = [h for h in order if (scores[h] > bound if highest else scores[h] <= bound)]
    return order if count is None else order[:max(0, count)]


def head_mask(heads: Sequence[Head], shape: tuple[int, int]) -> np.ndarray:
    """``[layers, heads]`` bool, true at ``heads``."""
    mask = np.zeros(shape, dtype=bool)
    for layer, head in heads:
        if not (0 <= layer < shape[0] and 0 <= head < shape[1]):
            raise ValueError(f"head {layer}.{head} is outside {shape[0]} layers x {shape[1]} heads.")
        mask[layer, head] = True
    return mask


def allocate(costs: list[list[float]], budget: int, minimum: int = 1) -> list[int]:
    """Heads run per token in each layer, ``k_l``: ``budget`` in all, at least ``minimum`` per layer,
    minimising ``sum_l costs[l][k_l]`` (``costs[l][k]``: the cost of layer ``l`` at ``k`` heads).

    Exact, by dynamic programming over layers and heads spent (costs need not be convex: a
    layer whose cost only falls at its last head still gets it when that is worth it)."""
    top = [len(c) - 1 for c in costs]
    low = [min(minimum, t) for t in top]
    if not sum(low) <= budget <= sum(top):
        raise ValueError(f"a budget of {budget} query heads per token is outside [{sum(low)}, {sum(top)}] for these "
                         "layers; choose an active fraction between them.")
    best = {0: (0.0, [])}                          # heads spent -> (cost, k per layer so far)
    for cost, lo, hi in zip(costs, low, top):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for spent, (total, ks) in best.items():
            for k in range(lo, hi + 1):
                if spent + k <= budget and (spent + k not in nxt or total + cost[k] < nxt[spent + k][0]):
                    nxt[spent + k] = (total + cost[k], ks + [k])
        best = nxt
    return best[budget][1]
