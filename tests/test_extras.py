"""Optional dependencies: a feature whose extra is missing says so in one sentence (headwise/extras.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from headwise.extras import MissingExtraError, require


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)          # as if scipy were not installed
    with pytest.raises(MissingExtraError, match=r"^headwise calibrate needs scipy, which is not installed; install "
                                                r"it with: pip install 'headwise\[calibrate\]'\.$"):
        require("scipy.optimize", "headwise calibrate")
    assert require("json", "anything").dumps([]) == "[]"


def test_the_milp_without_scipy_is_refused_in_one_sentence(monkeypatch):
    from headwise.calibrate.optimize import solve

    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(MissingExtraError, match=r"headwise\[calibrate\]"):
        solve({1024: np.zeros((1, 1, 2))}, {1024: np.array([1024, 100])}, {1024: 1.0}, 0.5)


def test_the_heatmap_without_matplotlib_is_skipped_with_one_sentence(monkeypatch, tmp_path, capsys, llama):
    from headwise.calibrate.heatmap import plan_heatmap
    from headwise.plan import Plan

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plan_heatmap(Plan.dense(llama), tmp_path / "h.png", [64]) is False
    assert not (tmp_path / "h.png").exists()
    assert "pip install 'headwise[plot]'" in capsys.readouterr().err
