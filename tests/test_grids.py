"""The two-tier grid helper: the fast cases cover every value of every dimension, the others are ``slow``."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.grids import covering, grid, label, listed


def fast_and_slow(params):
    fast = [p for p in params if not any(m.name == "slow" for m in p.marks)]
    slow = [p for p in params if any(m.name == "slow" for m in p.marks)]
    return fast, slow


def test_every_value_of_every_dimension_is_in_the_fast_cases():
    dims = {"length": [1, 15, 63, 130, 1000], "gqa": [1, 3, 4], "sink": [0, 4, 64], "window": ["win_lt", "win_gt"],
            "padding": ["left", "right"]}
    names, params = grid(dims, labels={"length": "len"})
    assert names == "length,gqa,sink,window,padding"
    assert len(params) == 5 * 3 * 3 * 2 * 2
    assert [tuple(p.values) for p in params] == list(itertools.product(*dims.values()))
    fast, slow = fast_and_slow(params)
    for i, values in enumerate(dims.values()):
        assert {p.values[i] for p in fast} == set(values)
    assert len(fast) == 5                                  # the longest dimension's values, one case each
    assert len(slow) == len(params) - len(fast)
    assert fast[0].id == "len1-gqa1-sink0-win_lt-left"
    assert len({p.id for p in params}) == len(params)


def test_where_drops_combinations_and_values_only_they_had():
    names, params = grid({"backend": ["cpu", "triton"], "length": [1, 63, 130]},
                         where=lambda backend, length: backend == "cpu" or length <= 63,
                         marks=lambda backend, length: [pytest.mark.triton] if backend == "triton" else [])
    assert [p.id for p in params] == ["cpu-length1", "cpu-length63", "cpu-length130", "triton-length1",
                                      "triton-length63"]
    fast, _ = fast_and_slow(params)
    assert {p.values[0] for p in fast} == {"cpu", "triton"} and {p.values[1] for p in fast} == {1, 63, 130}
    assert all(any(m.name == "triton" for m in p.marks) == (p.values[0] == "triton") for p in params)
    with pytest.raises(ValueError, match="keeps no combination"):
        grid({"x": [1, 2]}, where=lambda x: False)


def test_labels_of_dtypes_booleans_and_unhashable_values():
    assert label("dtype", torch.bfloat16) == "bf16" and label("dtype", torch.float32) == "fp32"
    assert label("with_state", True) == "with_state" and label("with_state", False) == "no_with_state"
    assert label("T", 63) == "T63" and label("length", 63, {"length": "len"}) == "len63"
    assert label("cuts", [7, 20], {"cuts": lambda c: "cut" + "_".join(map(str, c))}) == "cut7_20"
    _, params = grid({"cuts": [[7, 20], [1, 2, 30]]}, labels={"cuts": lambda c: f"{len(c)}cuts"})
    assert [p.id for p in params] == ["2cuts", "3cuts"] and not any(p.marks for p in params)


def test_covering_is_small_and_complete_on_a_filtered_product():
    combos = [c for c in itertools.product(range(4), range(3), range(2)) if (c[0] + c[1]) % 2 == 0]
    chosen = covering(combos, 3)
    for i in range(3):
        assert {combos[j][i] for j in chosen} == {c[i] for c in combos}
    assert len(chosen) <= 5


def test_listed_rows_times_more_dimensions():
    rows = [(1, "win_lt"), (65, "win_lt"), (200, "win_gt")]
    names, params = listed(["length", "window"], rows, {"dtype": [torch.float32, torch.bfloat16]},
                           labels={"length": "len"})
    assert names == "length,window,dtype"
    assert {tuple(p.values[:2]) for p in params} == set(rows) and len(params) == 6
    assert params[0].id == "len1-win_lt-fp32"
    fast, _ = fast_and_slow(params)
    assert {p.values[0] for p in fast} == {1, 65, 200} and {p.values[2] for p in fast} == {torch.float32, torch.bfloat16}
    assert len(fast) == 3


def test_the_module_docstring_example():
    _, params = grid({"length": [1, 63, 130], "gqa": [1, 3], "padding": ["left", "right"]}, labels={"length": "len"})
    fast, slow = fast_and_slow(params)
    assert [p.id for p in fast] == ["len1-gqa1-left", "len63-gqa3-right", "len130-gqa1-right"] and len(slow) == 9
