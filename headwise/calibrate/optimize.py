"""From profiles to a plan: candidate spans, the profiled mass they drop, and a binary MILP (HiGHS).

Every KV head picks exactly one candidate. Candidates come from the kinds (``kinds.candidates``:
by default window heads with a fixed sink and elastic span ``alpha + beta * N``, and a dense head);
the optimiser reads them only through ``kv_rule()`` (which keys a head keeps) and ``kept(n)``
(how many), and a candidate whose rule keeps every key is what "keeps everything" means.
A candidate's loss at length ``N`` is the profiled mass of the attention entries it drops
(``score``: sum of ``|E|``, or ``|sum of E|`` per tile and sample); entries are known per
``block x block`` tile, and a tile counts in proportion to the exact number of its causal entries
the head's band geometry drops. The MILP minimises the weighted, normalised loss subject to: total
kept tokens at most ``density * N * heads`` at every profiled length, and at most ``max_configs``
distinct candidates per layer. Several length weightings give Pareto plans; the one with the least
loss at a held-out length wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import CalibrationError
from ..kinds.base import HeadSpec
from ..kinds.rules import as_rule
from ..plan import ModelInfo, Plan

logger = logging.getLogger("headwise")

SCORES = {"abs": "blocks", "tile": "tiles"}     # --score name -> LengthProfile field

Rule = tuple                                    # a head's kv_rule(): (sink, alpha, beta, dense[, min_span])


def band(rule: Rule, n: int) -> tuple[int, int] | None:
    """``(sink, span)`` of a KV rule at length ``n``: query ``i`` keeps key ``j <= i`` iff ``j < sink``
    or ``j > i - span`` (the sink/window kernels' rule); ``None`` when it keeps every key."""
    rule = as_rule(rule)
    if rule.dense:
        return None
    span = rule.span(n)
    return None if rule.sink + span >= n else (int(rule.sink), span)


def keeps_everything(head: HeadSpec) -> bool:
    """Whether ``head``'s KV rule is the dense one (its ``kv_rule()`` dense flag)."""
    return bool(head.kv_rule()[3])


def guard_length(lengths: list[int], guard: int | None = None) -> int:
    """The short input ``min_span`` is checked at: ``guard`` when given, else half the shortest
    profiled length. Spans never shrink as ``N`` grows (``beta >= 0``), so a window that meets
    ``min_span`` at the guard meets it at every longer input."""
    return guard if guard is not None else max(1, min(lengths) // 2)


def candidate_grid(lengths: list[int], sink: int = 64, alpha_step: int | None = None, min_span: int = 0,
                   guard: int | None = None, floor: str = "candidate") -> list[HeadSpec]:
    """The candidates every KV head chooses from: each candidate kind's (``kinds.candidates``, the
    window grid then ``Dense``). ``floor="clamp"``: every window keeps ``max(min_span, alpha + beta*N)``
    (v3); ``"candidate"``: windows below ``min_span`` at ``guard_length(lengths, guard)`` are left out."""
    from .kinds import candidates

    return candidates(lengths, sink=sink, alpha_step=alpha_step, min_span=min_span,
                      guard=guard_length(lengths, guard), floor=floor)


def long_head_cap(lengths: list[int], density: float, heads: int, candidates: list[HeadSpec]) -> int:
    """Most heads that can keep everything while the rest still fit the budget at every length:
    the largest ``k`` with ``k * N + (heads - k) * m_N <= density * N * heads`` for every ``N``,
    ``m_N`` the least any other candidate keeps at ``N``."""
    partial = [c for c in candidates if not keeps_everything(c)]
    cap = heads
    if not partial:
        return 0
    for n in lengths:
        least = min(c.kept(n) for c in partial)
        if least >= n:
            return 0
        cap = min(cap, int(np.floor((density * n * heads - heads * least) / (n - least) + 1e-9)))
    return max(0, cap)


def budget_lengths(context: int, shortest: int = 256, count: int = 4) -> list[int]:
    """The lengths a plan's budget holds at when none are given: ``count`` doublings ending at the
    model's ``context`` (``context / 8 .. context`` for 4), none below ``shortest``.
    SmolLM2 (8192): 1024, 2048, 4096, 8192; a 32k model: 4096 .. 32768."""
    if context < shortest:
        raise ValueError(f"the model's context of {context} tokens is below the shortest calibrated length {shortest}.")
    return sorted({max(shortest, context >> k) for k in range(count)})


def budget_bounds(lengths: list[int], density: float, heads: int, candidates: list[HeadSpec], *,
                  tolerance: float | None, strict_from: int | None = None,
                  fixed: np.ndarray | None = None) -> dict[int, tuple[float, float]]:
    """Per length ``N``, the least and most kept tokens over all ``heads`` KV heads.

    ``tolerance=None``: at most ``density * N * heads`` (v1/v2: a plan may spend less).
    Otherwise ``density * N * heads`` within ``+-tolerance`` at every length from ``strict_from``
    on (default: every length); below it the span floor may push the least a plan can keep above
    the band, and the upper end rises to that least (the fixed heads' and every free head's
    smallest candidate). ``fixed``: ``[heads]`` candidate index per head, ``-1`` free.
    """
    out = {}
    strict_from = min(lengths) if strict_from is None else strict_from
    for n in lengths:
        target = density * n * heads
        if tolerance is None:
            out[n] = (-np.inf, target)
            continue
        low, high = (1 - tolerance) * target, (1 + tolerance) * target
        if n < strict_from:
            kept = np.array([c.kept(n) for c in candidates], dtype=np.float64)
            flat = np.full(heads, -1) if fixed is None else np.asarray(fixed).reshape(-1)
            least = float(sum(kept[i] if i >= 0 else kept.min() for i in flat))
            high = max(high, least)
        out[n] = (low, high)
    return out


def _dropped(kept: tuple[int, int] | None, n: int, block: int) -> np.ndarray:
    """``dropped_fraction`` of a band (``None``: keeps every key)."""
    nb = -(-n // block)
    if kept is None:
        return np.zeros((nb, nb))
    sink, span = kept
    i = np.arange(n)[:, None]                                   # [n, 1] queries
    start = np.arange(nb)[None, :] * block                      # [1, nb] key tile starts
    stop = np.minimum(start + block, n)
    causal = np.clip(np.minimum(stop, i + 1) - start, 0, None)
    dropped = np.clip(np.minimum(stop, i - span + 1) - np.maximum(start, sink), 0, None)
    pad = nb * block - n
    causal = np.pad(causal, ((0, pad), (0, 0))).reshape(nb, block, nb).sum(1)
    dropped = np.pad(dropped, ((0, pad), (0, 0))).reshape(nb, block, nb).sum(1)
    return np.divide(dropped, causal, out=np.zeros((nb, nb)), where=causal > 0)


def dropped_fraction(head: HeadSpec | Rule, n: int, block: int) -> np.ndarray:
    """Fraction of each tile's causal entries that ``head`` (a spec, or a ``kv_rule()`` tuple) drops
    at length ``n``.

    Query ``i`` keeps key ``j <= i`` iff ``j < sink`` or ``j > i - span(n)`` (the kernel's
    rule), so it drops keys ``sink <= j <= i - span``. Returns ``[nb, nb]`` float64,
    ``nb = ceil(n / block)``; tiles with no causal entry are 0.
    """
    return _dropped(band(head if isinstance(head, tuple) else head.kv_rule(), n), n, block)


def candidate_losses(blocks: np.ndarray, candidates: list[HeadSpec | Rule], n: int, block: int) -> np.ndarray:
    """Dropped ``|E|`` mass of every candidate (spec or ``kv_rule()`` tuple) for every head at length ``n``.

    Args:
        blocks: ``[layers, Hkv, nb, nb]`` float64 profile at length ``n``.

    Returns:
        ``[layers, Hkv, C]`` float64.
    """
    layers, heads, nb, _ = blocks.shape
    fractions, cache = [], {}
    for cand in candidates:
        key = band(cand if isinstance(cand, tuple) else cand.kv_rule(), n)
        if key not in cache:
            cache[key] = _dropped(key, n, block).reshape(-1)
        fractions.append(cache[key])
    return (blocks.reshape(layers * heads, nb * nb) @ np.stack(fractions, axis=1)).reshape(layers, heads, -1)


@dataclass
class Solution:
    """One MILP solve: ``choice`` ``[layers, Hkv]`` candidate indices and what it costs."""

    weights: dict[int, float]
    choice: np.ndarray
    status: str
    optimal: bool
    mip_gap: float | None
    normalized_loss: dict[int, float] = field(default_factory=dict)
    density: dict[int, float] = field(default_factory=dict)


def solve(losses: dict[int, np.ndarray], kept: dict[int, np.ndarray], weights: dict[int, float], density: float,
          max_configs: int = 2, time_limit: float = 300.0, mip_rel_gap: float = 1e-4,
          fixed: np.ndarray | None = None, bounds: dict[int, tuple[float, float]] | None = None,
          allowed: np.ndarray | None = None) -> Solution:
    """Binary MILP: one candidate per KV head, kept-token budget at every length, at most
    ``max_configs`` distinct candidates per layer; minimise ``sum_N w_N loss_N / total_N``.

    Args:
        losses: per length ``[layers, Hkv, C]`` dropped ``|E|`` (already normalised by the caller).
        kept: per length ``[C]`` kept tokens of each candidate (every length the budget holds at;
            lengths without losses only constrain).
        weights: per length weight of its normalised loss in the objective (lengths without a
            weight only constrain).
        density: kept-token budget as a fraction of ``N * layers * Hkv``.
        fixed: optional ``[layers, Hkv]`` int64 candidate index each head must take, ``-1`` for a
            free head (e.g. the long heads chosen by gates, fixed to the candidate that keeps everything).
        bounds: optional per length ``(least, most)`` total kept tokens (``budget_bounds``); default
            ``(-inf, density * N * heads)`` at every length of ``kept``.
        allowed: optional ``[layers, Hkv, C]`` bool, the candidates each head may take (default: all).

    Variables: ``x[l, h, c]`` (head picks candidate) then ``y[l, c]`` (layer uses candidate).
    """
    from ..extras import require

    require("scipy.optimize", "the calibrator's MILP")        # one sentence naming the extra if missing
    import scipy.optimize
    import scipy.sparse

    lengths = sorted(kept)
    layers, heads, C = next(iter(losses.values())).shape
    H = layers * heads
    nx, ny = H * C, layers * C
    cost = np.zeros(nx + ny)
    for n, w in weights.items():
        cost[:nx] += w * losses[n].reshape(-1)
    rows = []
    # exactly one candidate per head
    one = scipy.sparse.kron(scipy.sparse.eye(H), np.ones((1, C)))
    rows.append((scipy.sparse.hstack([one, scipy.sparse.csr_matrix((H, ny))]), np.ones(H), np.ones(H)))
    # kept tokens within budget at every length
    budget = np.stack([np.tile(kept[n], H) for n in lengths])
    if bounds is None:
        bounds = {n: (-np.inf, density * n * H) for n in lengths}
    least = np.array([bounds[n][0] for n in lengths])
    limit = np.array([bounds[n][1] for n in lengths])
    rows.append((scipy.sparse.hstack([scipy.sparse.csr_matrix(budget), scipy.sparse.csr_matrix((len(lengths), ny))]),
                 least, limit))
    # x[l, h, c] <= y[l, c]
    link_y = scipy.sparse.kron(scipy.sparse.eye(layers), scipy.sparse.kron(np.ones((heads, 1)), scipy.sparse.eye(C)))
    rows.append((scipy.sparse.hstack([scipy.sparse.eye(nx), -link_y]), np.full(nx, -np.inf), np.zeros(nx)))
    # at most max_configs candidates per layer
    per_layer = scipy.sparse.kron(scipy.sparse.eye(layers), np.ones((1, C)))
    rows.append((scipy.sparse.hstack([scipy.sparse.csr_matrix((layers, nx)), per_layer]),
                 np.full(layers, -np.inf), np.full(layers, float(max_configs))))
    constraints = [scipy.optimize.LinearConstraint(scipy.sparse.csr_matrix(a), lo, hi) for a, lo, hi in rows]
    lower, upper = np.zeros(nx + ny), np.ones(nx + ny)
    if allowed is not None:
        if allowed.shape != (layers, heads, C):
            raise ValueError(f"allowed candidates must have shape {(layers, heads, C)}, got {allowed.shape}.")
        upper[:nx] = allowed.reshape(-1)
    if fixed is not None:
        if fixed.shape != (layers, heads):
            raise ValueError(f"fixed heads must have shape {(layers, heads)}, got {fixed.shape}.")
        flat = fixed.reshape(-1)
        pinned = np.flatnonzero(flat >= 0)
        lower[pinned * C + flat[pinned]] = 1.0
    result = scipy.optimize.milp(cost, constraints=constraints, integrality=np.ones(nx + ny),
                                 bounds=scipy.optimize.Bounds(lower, upper),
                                 options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap, "presolve": True})
    if result.x is None:
        raise CalibrationError(no_plan_message(result.status, time_limit))
    x = np.round(result.x[:nx]).reshape(layers, heads, C)
    choice = x.argmax(-1)
    return Solution(weights, choice, result.message, result.status == 0, getattr(result, "mip_gap", None))


def no_plan_message(status: int, time_limit: float) -> str:
    """One sentence for a MILP that returned no plan: out of time (HiGHS status 1) or infeasible."""
    if status == 1:
        return (f"the MILP found no plan within its {time_limit:g} s time limit; raise --time-limit, or widen "
                "--budget-tolerance so that plans are easier to find.")
    return ("the MILP found no plan that fits the budget; raise the density or --budget-tolerance, or use a smaller "
            "sink, a smaller --min-span or longer lengths so that some candidates fit the budget.")


def length_weightings(fit_lengths: list[int], steps: int = 4) -> list[dict[int, float]]:
    """Weightings over the fit lengths for Pareto plans: each length alone, uniform, and (for
    two or more lengths) mixes in steps of ``1/steps`` between neighbours."""
    fit = sorted(fit_lengths)
    found: list[dict[int, float]] = [{n: 1.0 / len(fit) for n in fit}]
    for a, b in zip(fit, fit[1:]):
        for k in range(steps + 1):
            found.append({n: (1 - k / steps if n == a else k / steps if n == b else 0.0) for n in fit})
    if len(fit) == 1:
        found = [{fit[0]: 1.0}]
    unique, seen = [], set()
    for w in found:
        key = tuple(round(w[n], 9) for n in fit)
        if key not in seen:
            seen.add(key)
            unique.append(w)
    return unique


@dataclass
class Calibration:
    """Result of ``optimize``: the chosen plan, every Pareto solution, and solver details."""

    plan: Plan
    solutions: list[Solution]
    chosen: int
    candidates: list[HeadSpec]
    holdout: int | None


def optimize(profiles: dict, model_info: ModelInfo, density: float, candidates: list[HeadSpec], *,
             holdout: int | None = None, max_configs: int = 2, time_limit: float = 300.0, score: str = "abs",
             calibration: dict | None = None, long_heads: np.ndarray | None = None,
             uniform_sink: int | None = None, budget_at: list[int] | None = None, tolerance: float | None = None,
             strict_from: int | None = None, elastic_heads: np.ndarray | None = None,
             elastic_share: float = 0.5) -> Calibration:
    """Choose one of ``candidates`` per KV head from ``profiles`` (length -> ``LengthProfile``).

    ``candidates`` (e.g. ``candidate_grid``) are scored by the keys their ``kv_rule()`` drops and
    budgeted by their ``kept(n)``; with ``long_heads``, one of them must keep everything.

    ``score`` picks the tile mass a candidate drops: ``"abs"`` sums ``|E|`` over the tile's
    entries (MoA); ``"tile"`` takes ``|sum of E|`` over the tile per sample, the first-order loss
    change of dropping the tile at once, in which the many small entries of opposite sign cancel.

    Lengths other than ``holdout`` are the fit lengths the Pareto weightings mix; ``holdout``
    (if given) only picks the winner (least normalised loss there). The token budget holds at
    every profiled length, including the held-out one.

    ``long_heads`` (``[layers, Hkv]`` bool, optional) fixes those heads to the candidate that keeps
    everything (calibrator v2: chosen by their joint effect, see ``gates.py``); the MILP then sizes
    the others' spans under the same budget, which counts the fixed heads too.

    ``budget_at`` (optional) adds lengths the budget holds at without a profile (e.g. up to the
    model's context); ``tolerance`` keeps the kept tokens within ``density * N * heads +- tolerance``
    at every budget length from ``strict_from`` on (``budget_bounds``), instead of only below it.

    ``elastic_heads`` (``[layers, Hkv]`` bool, optional; calibrator v3 approach iii) restricts those
    heads to candidates that keep at least ``elastic_share * N`` at every budget length from
    ``strict_from`` on: retrieval heads that are not made dense keep a long elastic span instead.

    ``uniform_sink`` (optional) records, for comparison, the normalised loss of the uniform plan at
    the same density: every head keeps ``uniform_sink`` sink tokens and a window, ``density * N`` in all.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}.")
    if not candidates:
        raise ValueError("the calibrator needs at least one candidate head.")
    mass = {n: getattr(p, SCORES[score]) for n, p in profiles.items()}
    lengths = sorted(profiles)
    if holdout is not None and holdout not in profiles:
        raise ValueError(f"held-out length {holdout} was not profiled; profile it or pick one of {lengths}.")
    fit = [n for n in lengths if n != holdout] or lengths
    block = next(iter(profiles.values())).block
    losses, kept, totals = {}, {}, {}
    for n in lengths:
        totals[n] = mass[n].sum()
        if not totals[n] > 0:
            raise ValueError(f"the profile at length {n} is all zeros; re-run the profiling.")
        losses[n] = candidate_losses(mass[n], candidates, n, block) / totals[n]
    budgeted = sorted({*lengths, *(budget_at or ())})
    for n in budgeted:
        kept[n] = np.array([c.kept(n) for c in candidates], dtype=np.float64)
    heads_total = model_info.num_layers * model_info.num_kv_heads
    fixed = None
    if long_heads is not None:
        everything = [i for i, c in enumerate(candidates) if keeps_everything(c)]
        if not everything:
            raise ValueError("long heads need a candidate that keeps every key; add the dense candidate.")
        long_heads = np.asarray(long_heads, dtype=bool)
        fixed = np.where(long_heads, everything[0], -1).astype(np.int64)
    bounds = budget_bounds(budgeted, density, heads_total, candidates, tolerance=tolerance, strict_from=strict_from,
                           fixed=fixed)
    allowed = None
    if elastic_heads is not None:
        checked = [n for n in budgeted if n >= (strict_from or min(budgeted))]
        long_enough = np.all([kept[n] >= elastic_share * n for n in checked], axis=0)           # [C]
        if not long_enough.any():
            raise ValueError(f"no candidate keeps {elastic_share:g} of N at {checked}; lower the elastic share.")
        allowed = np.ones((*np.shape(elastic_heads), len(candidates)), dtype=bool)
        allowed[np.asarray(elastic_heads, dtype=bool)] = long_enough
    solutions = []
    for weights in length_weightings(fit):
        sol = solve(losses, kept, weights, density, max_configs, time_limit, fixed=fixed, bounds=bounds,
                    allowed=allowed)
        for n in lengths:
            sol.normalized_loss[n] = float(np.take_along_axis(losses[n], sol.choice[..., None], -1).sum())
        for n in budgeted:
            sol.density[n] = float(kept[n][sol.choice].sum() / (n * heads_total))
        logger.info("headwise: weights %s -> loss %s (%s)", weights, sol.normalized_loss, sol.status)
        solutions.append(sol)
    if holdout is None:
        scores = [sum(s.weights[n] * s.normalized_loss[n] for n in fit) for s in solutions]
    else:
        scores = [s.normalized_loss[holdout] for s in solutions]
    chosen = int(np.argmin(scores))           # first minimum: deterministic
    best = solutions[chosen]
    layers = tuple(tuple(candidates[c] for c in row) for row in best.choice.tolist())
    block_info = {
        "method": "moa-milp" if long_heads is None else "gates+milp", "density": density, "lengths": lengths,
        "fit_lengths": fit, "holdout_length": holdout, "score": score, "max_configs_per_layer": max_configs,
        **({"budget": {"lengths": budgeted, "tolerance": tolerance,
                       "strict_from": min(budgeted) if strict_from is None else strict_from,
                       "density": {str(k): v for k, v in best.density.items()}}}
           if budget_at is not None or tolerance is not None else {}),
        "candidates": len(candidates),
        "solver": f"scipy.optimize.milp (HiGHS), time limit {time_limit:g} s", "solver_status": best.status,
        "solver_optimal": all(s.optimal for s in solutions),
        "mip_gap": best.mip_gap, "chosen_weights": {str(k): v for k, v in best.weights.items()},
        "normalized_loss": {str(k): v for k, v in best.normalized_loss.items()},
        "pareto": [{"weights": {str(k): v for k, v in s.weights.items()},
                    "normalized_loss": {str(k): v for k, v in s.normalized_loss.items()},
                    "density": {str(k): v for k, v in s.density.items()}, "optimal": s.optimal}
                   for s in solutions],
        **(calibration or {}),
    }
    if uniform_sink is not None:
        uniform: Rule = (uniform_sink, float(-uniform_sink), float(density), False)
        block_info["uniform_normalized_loss"] = {
            str(n): float(candidate_losses(mass[n], [uniform], n, block).sum() / totals[n]) for n in lengths}
    plan = Plan(model_info, layers, block_info)
    plan.validate()
    return Calibration(plan, solutions, chosen, candidates, holdout)
