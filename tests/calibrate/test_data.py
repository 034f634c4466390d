import pytest

from headwise.calibrate.data import asked_depth


@pytest.mark.parametrize("count", [2, 3, 6, 12])
def test_asked_depths_spread_over_the_passage(count):
    """Any number of recall samples puts its asked facts at distinct depths covering [0.02, 0.98]
    evenly: every gap between neighbouring depths (and the two ends) is below 2/count of the range."""
    for length in (1024, 2048, 4096, 8192):
        depths = sorted(asked_depth(0, length, r) for r in range(count))
        assert all(0.02 <= d <= 0.98 for d in depths)
        edges = [0.02, *depths, 0.98]
        widest = max(b - a for a, b in zip(edges, edges[1:]))
        assert widest < 0.96 * 2 / count


def test_asked_depths_are_deterministic_per_seed_and_length():
    assert asked_depth(0, 2048, 3) == asked_depth(0, 2048, 3)
    assert asked_depth(0, 2048, 0) != asked_depth(1, 2048, 0)
    assert asked_depth(0, 2048, 0) != asked_depth(0, 4096, 0)
