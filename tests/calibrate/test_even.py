"""``--windows even``: the heads that are not long share the rest of the budget evenly."""

from __future__ import annotations

import numpy as np
import pytest

from headwise.calibrate.even import even_share, even_windows
from headwise.errors import CalibrationError
from headwise.plan import ModelInfo

INFO = ModelInfo(name="tiny", num_layers=4, num_heads=8, num_kv_heads=2, head_dim=16, max_length=8192,
                 fingerprint="0" * 64)
LENGTHS = [1024, 2048, 4096, 8192]


def mask(*heads):
    out = np.zeros((INFO.num_layers, INFO.num_kv_heads), dtype=bool)
    for l, h in heads:
        out[l, h] = True
    return out


@pytest.mark.parametrize("long_count,elastic_count,expected", [(0, 0, 0.25), (1, 0, 1 / 7), (1, 1, 0.5 / 6)],
                         ids=["no-long", "1-long", "1-long-1-elastic"])
def test_share_fills_the_budget(long_count, elastic_count, expected):
    assert even_share(0.25, 8, long_count, elastic_count, 0.5) == pytest.approx(expected)


def test_share_refuses_budgets_the_long_heads_take():
    with pytest.raises(CalibrationError, match="take the whole"):
        even_share(0.25, 8, 2, 0)
    with pytest.raises(CalibrationError, match="leave none"):
        even_share(1.0, 8, 8, 0)


def test_plan_keeps_long_heads_dense_and_every_other_the_same_window():
    plan = even_windows(INFO, 0.25, mask((1, 0)), sink=64, min_span=96, budget_at=LENGTHS, tolerance=0.01,
                        strict_from=2048, elastic_heads=mask((2, 1)), elastic_share=0.5,
                        calibration={"method": "gates+even"})
    assert plan.layers[1][0].kind == "dense"
    assert plan.layers[2][1].kept(8192) == 4096
    windows = {head for l, layer in enumerate(plan.layers) for h, head in enumerate(layer) if (l, h) not in {(1, 0), (2, 1)}}
    assert len(windows) == 1
    (window,) = windows
    assert window.beta == pytest.approx(0.5 / 6) and window.sink == 64 and window.alpha == -64
    for n in LENGTHS[1:]:
        assert plan.density(n) == pytest.approx(0.25, rel=0.01)
        assert plan.calibration["budget"]["density"][str(n)] == plan.density(n)
    assert plan.calibration["method"] == "gates+even"


def test_plan_refuses_a_span_floor_that_breaks_the_budget():
    with pytest.raises(CalibrationError, match="outside density 0.25"):
        even_windows(INFO, 0.25, mask((0, 0)), sink=64, min_span=512, budget_at=LENGTHS, tolerance=0.01,
                     strict_from=2048)
