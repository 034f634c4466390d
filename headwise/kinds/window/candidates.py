"""The calibrator's ``window`` candidates: MoA's grid of elastic spans ``alpha + beta * N``."""

from __future__ import annotations

import math

from .spec import Window

BETAS = tuple(i / 8 for i in range(9))


def floor_alphas(min_span: int, guard: int, betas: tuple[float, ...]) -> dict[float, float]:
    """Per ``beta``, the ``alpha`` whose span at ``guard`` is exactly ``min_span``: the most
    elastic window that still keeps the floor on short inputs (``{}`` without a floor)."""
    if min_span <= 0:
        return {}
    return {float(b): float(min_span - math.floor(b * guard)) for b in betas}


def candidates(lengths: list[int], *, sink: int = 64, alpha_step: int | None = None, min_span: int = 0,
               guard: int, betas: tuple[float, ...] = BETAS) -> list[Window]:
    """MoA's grid: ``alpha`` from ``-min(lengths)`` to ``max(lengths)`` in steps of
    ``min(lengths) / 8`` (plus ``alpha = -sink``, which with ``beta = d`` keeps exactly ``d * N``),
    every ``beta`` in ``betas``, a fixed sink.

    Windows that keep the same span at every length in ``lengths`` are merged (the first in grid
    order stays), and windows that keep everything at every length are left out (a dense candidate
    does that). Windows whose span at ``guard`` tokens is below ``min_span`` are left out: a large
    negative ``alpha`` fitted at long lengths would otherwise shrink to one token on short inputs.
    With a floor, every ``beta`` also gets the ``alpha`` that meets it exactly (``floor_alphas``),
    so the grid keeps its most elastic guarded window.
    """
    shortest, longest = min(lengths), max(lengths)
    step = alpha_step or max(1, shortest // 8)
    alphas = sorted({float(-sink), *(float(a) for a in range(-shortest, longest + 1, step))})
    at_floor = floor_alphas(min_span, guard, betas)
    seen: set[tuple[int, ...]] = set()
    grid: list[Window] = []
    for beta in betas:
        extra = at_floor.get(float(beta))
        for alpha in sorted({*alphas, *([extra] if extra is not None else [])}):
            head = Window(sink=sink, alpha=alpha, beta=float(beta))
            if head.span(guard) < min_span:
                continue
            kept = tuple(head.kept(n) for n in lengths)
            if all(k >= n for k, n in zip(kept, lengths)):
                continue
            spans = tuple(head.span(n) for n in lengths)
            if spans in seen:
                continue
            seen.add(spans)
            grid.append(head)
    return grid
