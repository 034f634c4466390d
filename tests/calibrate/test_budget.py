"""Calibrator v3's budget: a d-density plan keeps d*N of KV (within the tolerance) at every budget
length from the model's context down to ``strict_from``, with floored elastic candidates, lengths
derived from the model's context (never SmolLM2's), with and without gate-fixed dense heads."""

from __future__ import annotations

import numpy as np
import pytest

from headwise.calibrate.optimize import budget_bounds, budget_lengths, candidate_grid, long_head_cap, optimize
from headwise.kinds.window import Window
from tests.calibrate.test_optimize import INFO, _synthetic_profiles

PROFILED = [256, 512]
BUDGET = [256, 512, 1024, 2048, 4096]        # INFO's context is 4096


def test_budget_lengths_come_from_the_models_context():
    assert budget_lengths(8192) == [1024, 2048, 4096, 8192]           # SmolLM2
    assert budget_lengths(32768) == [4096, 8192, 16384, 32768]        # a 32k model
    assert budget_lengths(4096) == [512, 1024, 2048, 4096]
    assert budget_lengths(1024) == [256, 512, 1024]                    # never below the shortest length
    with pytest.raises(ValueError, match="context"):
        budget_lengths(128)


def test_floored_candidates_are_elastic_and_never_below_the_floor():
    grid = [c for c in candidate_grid(BUDGET, sink=16, min_span=32, floor="clamp") if isinstance(c, Window)]
    assert all(c.min_span == 32 for c in grid)
    assert len({c.beta for c in grid}) >= 5                            # several elastic shares
    assert all(c.span(n) >= 32 for c in grid for n in (33, 100, 256, 4096))
    # a share that grows with N (beta > 0) with a negative alpha is allowed: the floor holds at short N
    assert any(c.beta > 0 and c.alpha < 0 for c in grid)


@pytest.mark.parametrize("long", [False, True], ids=["profile-only", "gate-fixed-dense-heads"])
@pytest.mark.parametrize("density", [0.25, 0.4])
def test_kept_kv_holds_the_density_at_every_budget_length(density, long):
    profiles = _synthetic_profiles(PROFILED, seed=5)
    grid = candidate_grid(BUDGET, sink=16, alpha_step=32, min_span=32, floor="clamp")
    heads = INFO.num_layers * INFO.num_kv_heads
    fixed = None
    if long:
        fixed = np.zeros((INFO.num_layers, INFO.num_kv_heads), dtype=bool)
        fixed[1, 0] = True                               # one dense head of 8 (12.5 of the points)
        assert long_head_cap(BUDGET[1:], density, heads, grid) >= 1
    result = optimize(profiles, INFO, density, grid, holdout=512, long_heads=fixed, budget_at=BUDGET,
                      tolerance=0.01, strict_from=512, time_limit=60)
    plan = result.plan
    for n in BUDGET[1:]:
        assert abs(plan.density(n) / density - 1) <= 0.01 + 1e-9, f"kept {plan.density(n):.4f} at N={n}"
    assert plan.density(256) >= density * 0.99           # below strict_from the floor may only push it up
    budget = plan.calibration["budget"]
    assert budget["lengths"] == BUDGET and budget["tolerance"] == 0.01 and budget["strict_from"] == 512
    assert set(budget["density"]) == {str(n) for n in BUDGET}
    for sol in result.solutions:                         # every Pareto plan, not only the chosen one
        assert all(abs(sol.density[n] / density - 1) <= 0.01 + 1e-9 for n in BUDGET[1:])


def test_without_a_tolerance_the_budget_is_only_a_ceiling():
    """v1/v2 (``tolerance=None``): at most d*N at every length, so a plan may spend less as N grows;
    the v3 band is what keeps the share."""
    profiles = _synthetic_profiles(PROFILED, seed=5)
    grid = candidate_grid(BUDGET, sink=16, alpha_step=32, min_span=32, floor="clamp")
    plan = optimize(profiles, INFO, 0.25, grid, holdout=512, budget_at=BUDGET, time_limit=60).plan
    assert all(plan.density(n) <= 0.25 + 1e-9 for n in BUDGET)
    assert "tolerance" not in plan.calibration.get("budget", {}) or plan.calibration["budget"]["tolerance"] is None


def test_bounds_below_strict_from_rise_to_what_the_floor_forces():
    grid = [Window(sink=16, alpha=32.0, beta=0.0, min_span=32), Window(sink=16, alpha=-16.0, beta=0.25, min_span=32)]
    bounds = budget_bounds([256, 1024], 0.1, 8, grid, tolerance=0.01, strict_from=1024)
    assert bounds[1024] == pytest.approx((0.99 * 0.1 * 1024 * 8, 1.01 * 0.1 * 1024 * 8))
    assert bounds[256][1] == 8 * 48                      # every head's least: sink 16 + floor 32 > 10% of 256
    assert budget_bounds([256], 0.1, 8, grid, tolerance=None)[256] == (-np.inf, 0.1 * 256 * 8)


def test_elastic_heads_keep_their_share_at_every_budget_length():
    """Approach iii: retrieval heads not made dense keep a long elastic span (>= share * N from
    strict_from on), inside the same budget band."""
    profiles = _synthetic_profiles(PROFILED, seed=5)
    grid = candidate_grid(BUDGET, sink=16, alpha_step=32, min_span=32, floor="clamp")
    long = np.zeros((INFO.num_layers, INFO.num_kv_heads), dtype=bool)
    long[1, 0] = True
    elastic = np.zeros_like(long)
    elastic[2, 1] = elastic[3, 0] = True
    free = optimize(profiles, INFO, 0.4, grid, holdout=512, long_heads=long, budget_at=BUDGET, tolerance=0.01,
                    strict_from=512, time_limit=60).plan
    assert min(free.layers[2][1].kept(n) / n for n in BUDGET[1:]) < 0.5     # the profile alone keeps them short
    plan = optimize(profiles, INFO, 0.4, grid, holdout=512, long_heads=long, budget_at=BUDGET, tolerance=0.01,
                    strict_from=512, time_limit=60, elastic_heads=elastic, elastic_share=0.5).plan
    for l, h in [(2, 1), (3, 0)]:
        assert all(plan.layers[l][h].kept(n) >= 0.5 * n for n in BUDGET[1:])
    assert plan.layers[1][0].kind == "dense"
    assert all(abs(plan.density(n) / 0.4 - 1) <= 0.01 + 1e-9 for n in BUDGET[1:])
    with pytest.raises(ValueError, match="lower the elastic share"):
        optimize(profiles, INFO, 0.3, [c for c in grid if c.kind != "dense"], holdout=512, budget_at=BUDGET,
                 tolerance=0.01, strict_from=512, elastic_heads=elastic, elastic_share=1.0)
