"""The calibrator's ``window`` candidates: MoA's grid of elastic spans ``alpha + beta * N``.

Two ways to keep a floor of ``min_span`` recent tokens on short inputs (``floor``):

- ``"clamp"`` (calibrator v3): every candidate carries ``min_span`` in its rule, so its span is
  ``max(min_span, alpha + beta * N)``: elastic heads keep their share of long contexts and never
  fall below the floor on short ones (``elastic_candidates``).
- ``"candidate"`` (v1/v2): candidates whose span at ``guard`` tokens is below ``min_span`` are left
  out; the floor then becomes a fixed window at long ``N`` for heads that need a small span.
"""

from __future__ import annotations

import math

from .spec import Window

BETAS = tuple(i / 8 for i in range(9))
#: v3's elastic shares: fine steps where a 25% plan's window heads live (a few % of N), coarse above
ELASTIC_BETAS = (0.0, 1 / 32, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
FLOORS = ("clamp", "candidate")


def floor_alphas(min_span: int, guard: int, betas: tuple[float, ...]) -> dict[float, float]:
    """Per ``beta``, the ``alpha`` whose span at ``guard`` is exactly ``min_span``: the most
    elastic window that still keeps the floor on short inputs (``{}`` without a floor)."""
    if min_span <= 0:
        return {}
    return {float(b): float(min_span - math.floor(b * guard)) for b in betas}


def elastic_candidates(lengths: list[int], *, sink: int = 64, alpha_step: int | None = None, min_span: int = 0,
                       betas: tuple[float, ...] = ELASTIC_BETAS) -> list[Window]:
    """v3's grid: spans ``clamp(floor(alpha + beta * N), min_span, N)`` for every ``beta`` in ``betas``
    and ``alpha`` in ``{-sink} U [-shortest/2, shortest]`` (step ``alpha_step``, default
    ``shortest / 8``), plus fixed windows (``beta = 0``) of ``min_span`` up to half the longest
    length in doublings. ``lengths`` are the lengths the budget holds at (shortest to the model's
    context): candidates with the same span at each are merged (first in grid order stays), and
    those keeping everything at every length are left out (the dense candidate does that).
    """
    shortest, longest = min(lengths), max(lengths)
    step = alpha_step or max(1, shortest // 8)
    alphas = sorted({float(-sink), *(float(a) for a in range(-(shortest // 2), shortest + 1, step))})
    fixed = [float(max(1, min_span))]
    while fixed[-1] * 2 <= longest // 2:
        fixed.append(fixed[-1] * 2)
    grid = [Window(sink=sink, alpha=a, beta=0.0, min_span=min_span) for a in fixed]
    grid += [Window(sink=sink, alpha=a, beta=float(b), min_span=min_span) for b in betas if b > 0 for a in alphas]
    return _distinct(grid, lengths)


def _distinct(grid: list[Window], lengths: list[int]) -> list[Window]:
    """``grid`` without heads that keep everything at every length or the spans of an earlier head."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for head in grid:
        if all(head.kept(n) >= n for n in lengths):
            continue
        spans = tuple(head.span(n) for n in lengths)
        if spans not in seen:
            seen.add(spans)
            out.append(head)
    return out


def candidates(lengths: list[int], *, sink: int = 64, alpha_step: int | None = None, min_span: int = 0,
               guard: int, betas: tuple[float, ...] | None = None, floor: str = "candidate") -> list[Window]:
    """MoA's grid: ``alpha`` from ``-min(lengths)`` to ``max(lengths)`` in steps of
    ``min(lengths) / 8`` (plus ``alpha = -sink``, which with ``beta = d`` keeps exactly ``d * N``),
    every ``beta`` in ``betas``, a fixed sink.

    Windows that keep the same span at every length in ``lengths`` are merged (the first in grid
    order stays), and windows that keep everything at every length are left out (a dense candidate
    does that). Windows whose span at ``guard`` tokens is below ``min_span`` are left out: a large
    negative ``alpha`` fitted at long lengths would otherwise shrink to one token on short inputs.
    With a floor, every ``beta`` also gets the ``alpha`` that meets it exactly (``floor_alphas``),
    so the grid keeps its most elastic guarded window.

    ``floor="clamp"``: v3's grid instead (``elastic_candidates``; ``guard`` unused).
    """
    if floor not in FLOORS:
        raise ValueError(f"floor must be one of {', '.join(FLOORS)}, got {floor!r}.")
    if floor == "clamp":
        return elastic_candidates(lengths, sink=sink, alpha_step=alpha_step, min_span=min_span,
                                  **({"betas": betas} if betas is not None else {}))
    betas = BETAS if betas is None else betas
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
