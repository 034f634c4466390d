"""``calibrate.select``: ranking with ties by head, counts and bounds, budgets as upper bounds,
masks, and the exact per-layer allocation (its own tests are in tests/kinds/test_moh.py)."""

from __future__ import annotations

import numpy as np
import pytest

from headwise.calibrate.select import budget_count, head_mask, ranked, select


def test_ranking_breaks_ties_by_head_and_reads_tuple_scores():
    scores = {(1, 0): 0.5, (0, 1): 0.5, (0, 0): 0.9, (2, 1): 0.1}
    assert ranked(scores) == [(2, 1), (0, 1), (1, 0), (0, 0)]
    assert ranked(scores, highest=True) == [(0, 0), (0, 1), (1, 0), (2, 1)]
    gates = {(0, 0): (1.0, 0.1), (0, 1): (1.0, 0.3), (1, 0): (0.2, 9.0)}
    assert ranked(gates, highest=True) == [(0, 1), (0, 0), (1, 0)]     # equal gates: more important first


def test_select_cuts_at_count_and_bound():
    errors = {(0, 0): 0.5, (0, 1): 0.1, (1, 0): 0.3, (1, 1): 0.05}
    assert select(errors, count=2) == [(1, 1), (0, 1)]
    assert select(errors, bound=0.3) == [(1, 1), (0, 1), (1, 0)]         # at most the bound
    gains = {(0, 0): 0.0, (0, 1): 0.2, (1, 0): -1.0}
    assert select(gains, highest=True, bound=0.0) == [(0, 1)]           # strictly above the bound
    assert select(errors, count=0) == [] and select({}, count=3) == []


def test_budget_is_an_upper_bound():
    assert budget_count(0.25, 90) == 22 and budget_count(0.1, 90) == 9 and budget_count(0.3, 10) == 3
    assert budget_count(1.0, 7) == 7 and budget_count(0.0, 7) == 0
    with pytest.raises(ValueError, match="fraction in"):
        budget_count(1.5, 4)


def test_head_mask():
    mask = head_mask([(0, 1), (2, 0)], (3, 2))
    assert mask.dtype == bool and np.argwhere(mask).tolist() == [[0, 1], [2, 0]]
    with pytest.raises(ValueError, match="outside 3 layers x 2 heads"):
        head_mask([(3, 0)], (3, 2))
