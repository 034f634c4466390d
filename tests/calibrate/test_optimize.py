"""Candidate geometry, the MILP's constraints and optimality, and determinism (synthetic profiles)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from headwise.calibrate.optimize import (candidate_grid, candidate_losses, dropped_fraction, length_weightings,
                                         optimize, solve)
from headwise.calibrate.profile import LengthProfile
from headwise.kernels.sink_window.naive import visible
from headwise.plan import ModelInfo
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window

INFO = ModelInfo(name="synthetic", num_layers=4, num_heads=6, num_kv_heads=2, head_dim=16, max_length=4096,
                 fingerprint="0" * 64)


def _synthetic_profiles(lengths, block=64, seed=0):
    """Causal tiles whose mass decays with distance, with a random scale per head: some heads
    look local, some global."""
    rng = np.random.default_rng(seed)
    reach = rng.uniform(0.5, 40.0, size=(INFO.num_layers, INFO.num_kv_heads, 1, 1))
    sink = rng.uniform(0.0, 5.0, size=(INFO.num_layers, INFO.num_kv_heads, 1, 1))
    profiles = {}
    for n in lengths:
        nb = -(-n // block)
        q, k = np.arange(nb)[:, None], np.arange(nb)[None, :]
        distance = np.where(k <= q, q - k, -1)
        tiles = np.where(distance >= 0, np.exp(-distance / reach), 0.0)
        tiles[..., :, 0] += np.where(distance[:, 0] >= 0, sink[..., 0], 0.0)
        tiles *= rng.uniform(0.5, 1.5, size=tiles.shape)
        profiles[n] = LengthProfile(n, block, tiles, tiles, 1, 0.0, 0.0)
    return profiles


@pytest.mark.parametrize("n,block", [(256, 64), (300, 64), (200, 16), (128, 1)])
@pytest.mark.parametrize("head", [Window(sink=64, alpha=-64, beta=0.25), Window(sink=16, alpha=40, beta=0.0),
                                  Window(sink=0, alpha=10, beta=0.5), Window(sink=64, alpha=-500, beta=0.125),
                                  Dense()])
def test_dropped_fraction_matches_the_kernels_visibility_rule(head, n, block):
    pos = torch.arange(n)
    if isinstance(head, Window):
        seen = visible(pos[None], pos[None, None], torch.tensor([head.sink]), torch.tensor([[head.span(n)]]))[0, 0].numpy()
    else:
        seen = np.tril(np.ones((n, n), dtype=bool))
    causal = np.tril(np.ones((n, n)))
    dropped = causal * ~seen
    nb = -(-n // block)
    pad = nb * block - n
    tile = lambda m: np.pad(m, ((0, pad), (0, pad))).reshape(nb, block, nb, block).sum((1, 3))  # noqa: E731
    want = np.divide(tile(dropped), tile(causal), out=np.zeros((nb, nb)), where=tile(causal) > 0)
    np.testing.assert_allclose(dropped_fraction(head, n, block), want, atol=1e-12)
    # the head keeps exactly kept(n) keys for the last query
    assert seen[-1].sum() == head.kept(n)


def test_candidate_grid_is_deduplicated_and_ends_with_dense():
    grid = candidate_grid([1024, 2048, 4096])
    assert isinstance(grid[-1], Dense) and all(isinstance(c, Window) for c in grid[:-1])
    spans = [tuple(c.span(n) for n in (1024, 2048, 4096)) for c in grid[:-1]]
    assert len(spans) == len(set(spans))
    assert Window(sink=64, alpha=-64.0, beta=0.25) in grid          # the uniform plan's head is a candidate
    assert all(any(c.kept(n) < n for n in (1024, 2048, 4096)) for c in grid[:-1])


def test_min_span_keeps_short_inputs_covered():
    full = candidate_grid([1024, 2048, 4096])
    guarded = candidate_grid([1024, 2048, 4096], min_span=64)
    assert any(c.span(512) < 64 for c in full[:-1])
    assert all(c.span(n) >= 64 for c in guarded[:-1] for n in (512, 1024, 8192))
    assert Window(sink=64, alpha=-64.0, beta=0.25) in guarded and isinstance(guarded[-1], Dense)


def _check_constraints(plan, density, lengths, max_configs):
    heads = plan.model.num_layers * plan.model.num_kv_heads
    for n in lengths:
        assert sum(map(sum, plan.kept(n))) <= density * n * heads
        assert plan.density(n) <= density
    for layer in plan.layers:
        assert len(set(layer)) <= max_configs
        assert len(layer) == plan.model.num_kv_heads


@pytest.mark.parametrize("density,max_configs", [(0.25, 2), (0.5, 2), (0.3, 1), (0.25, 3)])
def test_milp_plan_respects_every_constraint(density, max_configs):
    lengths = [256, 512, 1024]
    profiles = _synthetic_profiles(lengths)
    result = optimize(profiles, INFO, density, candidate_grid(lengths, sink=16, alpha_step=64), holdout=1024,
                      max_configs=max_configs)
    _check_constraints(result.plan, density, lengths, max_configs)
    assert len(result.solutions) == len(length_weightings([256, 512]))
    assert result.plan.calibration["solver_optimal"] is True
    chosen = result.solutions[result.chosen]
    assert chosen.normalized_loss[1024] == min(s.normalized_loss[1024] for s in result.solutions)
    # a budget-filling plan beats keeping less: something besides the tightest window was used
    assert result.plan.density(1024) > density * 0.5


def test_milp_finds_the_brute_force_optimum():
    """On an instance small enough to enumerate, the MILP's objective is the true minimum."""
    rng = np.random.default_rng(1)
    layers, heads, C = 2, 2, 4
    lengths = [256, 512]
    losses = {n: rng.uniform(0, 1, size=(layers, heads, C)) for n in lengths}
    kept = {n: np.array([0.1, 0.3, 0.6, 1.0]) * n for n in lengths}
    weights = {256: 0.3, 512: 0.7}
    density, max_configs = 0.45, 1
    sol = solve(losses, kept, weights, density, max_configs)
    objective = lambda ch: sum(w * losses[n][l, h, ch[l][h]] for n, w in weights.items()  # noqa: E731
                               for l in range(layers) for h in range(heads))
    best = None
    for flat in itertools.product(range(C), repeat=layers * heads):
        ch = np.array(flat).reshape(layers, heads)
        if any(len(set(row)) > max_configs for row in ch.tolist()):
            continue
        if any(kept[n][ch].sum() > density * n * layers * heads for n in lengths):
            continue
        value = objective(ch.tolist())
        best = value if best is None else min(best, value)
    assert objective(sol.choice.tolist()) == pytest.approx(best, rel=1e-9)


def test_same_inputs_give_the_same_plan():
    lengths = [256, 512]
    grid = candidate_grid(lengths, sink=16, alpha_step=64)
    a = optimize(_synthetic_profiles(lengths), INFO, 0.25, grid, holdout=512).plan
    b = optimize(_synthetic_profiles(lengths), INFO, 0.25, list(grid), holdout=512).plan
    assert a.to_json() == b.to_json()


def test_candidate_losses_are_dropped_mass():
    profiles = _synthetic_profiles([512])
    blocks = profiles[512].blocks
    cands = [Window(sink=64, alpha=-64, beta=0.25), Dense(), Window(sink=0, alpha=1, beta=0.0)]
    got = candidate_losses(blocks, cands, 512, 64)
    assert np.all(got[..., 1] == 0)
    # keeping only the diagonal token (no sink) drops more than a quarter window with a sink
    assert np.all(got[..., 2] > got[..., 0])
    np.testing.assert_allclose(got[..., 0], (blocks * dropped_fraction(cands[0], 512, 64)).sum((-1, -2)))


def test_calibrated_plan_drops_less_than_uniform_at_equal_budget():
    """The uniform sink + window head is a feasible candidate, so the optimum can only do better
    on the weighted objective; the calibration block reports both."""
    lengths = [256, 512, 1024]
    result = optimize(_synthetic_profiles(lengths, seed=2), INFO, 0.25, candidate_grid(lengths, sink=16, alpha_step=64),
                      holdout=1024, uniform_sink=16)
    chosen = result.solutions[result.chosen]
    uniform = result.plan.calibration["uniform_normalized_loss"]
    assert sum(w * chosen.normalized_loss[n] for n, w in chosen.weights.items()) <= \
        sum(w * uniform[str(n)] for n, w in chosen.weights.items()) * (1 + 1e-3)  # MIP gap 1e-4


def test_score_picks_which_tile_mass_the_candidates_drop():
    """``abs`` reads ``LengthProfile.blocks``, ``tile`` reads ``LengthProfile.tiles``: with far
    mass of one head only in ``tiles``, the tile score must keep that head's distant keys."""
    lengths = [256, 512]
    profiles = _synthetic_profiles(lengths, seed=4)
    for n, p in profiles.items():
        local = np.where(np.eye(p.blocks.shape[-1], dtype=bool), 1.0, 0.0) * np.ones_like(p.blocks)
        far = local.copy()
        far[0, 0, :, 0:2] += np.tril(np.ones_like(far[0, 0]))[:, 0:2] * 50.0   # head (0, 0) reads its first tiles
        profiles[n] = LengthProfile(n, p.block, local, far, 1, 0.0, 0.0)
    grid = candidate_grid(lengths, sink=0, alpha_step=64)
    by_abs = optimize(profiles, INFO, 0.5, grid, holdout=512, score="abs", uniform_sink=0)
    by_tile = optimize(profiles, INFO, 0.5, grid, holdout=512, score="tile", uniform_sink=0)
    assert by_abs.plan.calibration["score"] == "abs" and by_tile.plan.calibration["score"] == "tile"
    assert by_tile.plan.layers[0][0].kept(512) >= 256       # reaches back for its first tiles
    abs_uniform, tile_uniform = (r.plan.calibration["uniform_normalized_loss"]["512"] for r in (by_abs, by_tile))
    assert tile_uniform > abs_uniform
    with pytest.raises(ValueError, match="score must be one of"):
        optimize(profiles, INFO, 0.5, grid, score="mean")


def test_span_floor_holds_from_the_guard_length_on_and_keeps_its_most_elastic_window():
    grid = candidate_grid([1024, 2048, 4096], min_span=96, guard=256)
    windows = [c for c in grid if isinstance(c, Window)]
    assert all(c.span(n) >= 96 for c in windows for n in (256, 300, 512, 1024, 8192))
    # per beta, the alpha that meets the floor exactly is a candidate (the most elastic guarded window)
    assert Window(sink=64, alpha=64.0, beta=0.125) in windows
    assert Window(sink=64, alpha=96.0, beta=0.0) in windows
    # the uniform head shrinks to one token at 256 and is left out
    assert Window(sink=64, alpha=-64.0, beta=0.25) not in windows


def test_optimize_with_a_span_floor_keeps_every_head_above_it():
    lengths = [256, 512, 1024]
    result = optimize(_synthetic_profiles(lengths), INFO, 0.5,
                      candidate_grid(lengths, sink=16, alpha_step=64, min_span=64, guard=128), holdout=1024)
    for head in result.plan.heads:
        if isinstance(head, Window):
            assert head.span(128) >= 64
    _check_constraints(result.plan, 0.5, lengths, 2)


def test_the_optimiser_reads_candidates_only_through_their_kv_rule_and_kept():
    """A candidate of a kind the optimiser has never heard of is scored by its KV rule: a spec that
    only states ``kv_rule()`` and ``kept(n)`` drops exactly what the window with the same rule drops,
    and one whose rule is dense is what long heads are fixed to."""
    from dataclasses import dataclass

    from headwise.kinds.base import HeadSpec
    from headwise.kinds.rules import as_rule

    @dataclass(frozen=True)
    class Rule(HeadSpec):
        rule: tuple = (0, 0.0, 0.0, True)
        kind = "rule-only"

        def kv_rule(self):
            return self.rule

        def kept(self, n):
            rule = as_rule(self.rule)
            return n if rule.dense else min(n, rule.sink + rule.span(n))

    lengths = [256, 512]
    profiles = _synthetic_profiles(lengths, seed=3)
    window = Window(sink=16, alpha=48.0, beta=0.125)
    alike = Rule(window.kv_rule())
    for n in lengths:
        np.testing.assert_array_equal(candidate_losses(profiles[n].blocks, [alike], n, 64),
                                      candidate_losses(profiles[n].blocks, [window], n, 64))
    long = np.zeros((INFO.num_layers, INFO.num_kv_heads), dtype=bool)
    long[1, 0] = True
    result = optimize(profiles, INFO, 0.5, [alike, Rule()], holdout=512, long_heads=long)
    assert result.plan.layers[1][0] == Rule() and result.plan.calibration["method"] == "gates+milp"
    with pytest.raises(ValueError, match="candidate that keeps every key"):
        optimize(profiles, INFO, 0.5, [alike], holdout=512, long_heads=long)


def test_window_and_dense_candidates_come_from_their_kinds():
    from headwise.calibrate import kinds
    from headwise.kinds.dense.candidates import candidates as dense_candidates
    from headwise.kinds.window.candidates import candidates as window_candidates

    lengths = [1024, 2048]
    assert set(kinds.candidate_kinds()) == {"window", "dense"}
    assert candidate_grid(lengths, sink=32, min_span=64, guard=256) == \
        window_candidates(lengths, sink=32, min_span=64, guard=256) + dense_candidates(lengths)


def test_a_milp_without_a_plan_says_why_in_one_sentence():
    """Infeasible budget and an exhausted time limit are different errors with different fixes."""
    from headwise.calibrate.optimize import solve
    from headwise.errors import CalibrationError

    losses = {1024: np.ones((2, 2, 2))}
    kept = {1024: np.array([512.0, 1024.0])}                 # every candidate keeps >= half
    with pytest.raises(CalibrationError, match="no plan that fits the budget"):
        solve(losses, kept, {1024: 1.0}, density=0.25)
    from headwise.calibrate.optimize import no_plan_message
    assert "within its 60 s time limit; raise --time-limit" in no_plan_message(1, 60.0)
