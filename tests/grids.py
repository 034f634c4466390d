"""Parameter grids in two tiers: a covering subset runs in ``make test``, the rest of the grid under ``slow``.

A kernel test compares a backend with its reference over a cartesian grid of shapes (lengths, GQA
ratios, sinks, windows, padding, ...). The whole grid runs in ``make test-all``; ``make test`` runs a
*covering* subset of it: every value of every dimension appears in at least one case, so each
code path a single dimension selects still runs, in a handful of cases instead of hundreds::

    @pytest.mark.parametrize(*grid({"length": [1, 63, 130], "gqa": [1, 3], "padding": ["left", "right"]},
                                   labels={"length": "len"}))
    def test_x(length, gqa, padding): ...

gives the ids ``len1-gqa1-left``, ``len63-gqa3-right``, ``len130-gqa1-right`` (fast tier) and the nine
other combinations marked ``slow``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def label(name: str, value: Any, labels: Mapping[str, str | Callable[[Any], str]] | None = None) -> str:
    """The id part of one dimension's value: strings as they are, numbers after a prefix (the dimension's
    name unless ``labels`` gives another prefix or a function), dtypes as ``fp32``/``bf16``, booleans as
    the name or ``no_<name>``."""
    how = (labels or {}).get(name, name)
    if callable(how):
        return str(how(value))
    if isinstance(value, bool):
        return how if value else f"no_{how}"
    if isinstance(value, str):
        return value
    if type(value).__name__ == "dtype":                    # torch.dtype, without importing torch here
        return DTYPE_LABELS.get(str(value).removeprefix("torch."), str(value))
    return f"{how}{value}"


def covering(combos: Sequence[tuple], width: int) -> list[int]:
    """Indices into ``combos`` (tuples of ``width`` hashable values, e.g. indices into each dimension's
    values) such that every value that appears at position ``i`` of some combo appears at position ``i``
    of a chosen one.

    Greedy: each step takes the combo that covers the most values not yet covered, then, among those,
    the most pairs of values not yet seen together (so the cases vary in the other dimensions too), then
    the first; the subset has about as many cases as the largest dimension has values.
    """
    missing = {(i, combo[i]) for combo in combos for i in range(width)}
    seen_pairs: set[tuple] = set()
    pairs = [{(i, combo[i], j, combo[j]) for i in range(width) for j in range(i + 1, width)} for combo in combos]
    chosen: list[int] = []
    while missing:
        def score(k: int) -> tuple:
            return sum((i, combos[k][i]) in missing for i in range(width)), len(pairs[k] - seen_pairs), -k

        best = max(range(len(combos)), key=score)
        chosen.append(best)
        missing -= {(i, combos[best][i]) for i in range(width)}
        seen_pairs |= pairs[best]
    return sorted(chosen)


def grid(dims: Mapping[str, Sequence], *, where: Callable[..., bool] | None = None,
         labels: Mapping[str, str | Callable[[Any], str]] | None = None,
         marks: Callable[..., Sequence] | None = None) -> tuple[str, list]:
    """``(argnames, params)`` for ``pytest.mark.parametrize``: the cartesian product of ``dims``.

    Args:
        dims: dimension name -> its values, in the test function's argument order.
        where: keeps only the combinations for which ``where(**combo)`` is true (shapes a backend skips).
        labels: id prefix (or function value -> id) per dimension, see ``label``.
        marks: ``marks(**combo)`` -> marks every case of that combination carries (``pytest.mark.triton``).

    Returns:
        Every kept combination as a ``pytest.param`` with a readable id; the covering subset (every value
        of every dimension at least once) plain, every other combination marked ``slow``.
    """
    names = list(dims)
    values = [list(dims[n]) for n in names]
    combos = [c for c in itertools.product(*(range(len(v)) for v in values))       # indices: values need not hash
              if where is None or where(**{n: v[i] for n, v, i in zip(names, values, c)})]
    if not combos:
        raise ValueError(f"the grid over {', '.join(names)} keeps no combination")
    fast = set(covering(combos, len(names)))
    params = []
    for j, combo in enumerate(combos):
        kwargs = {n: v[i] for n, v, i in zip(names, values, combo)}
        case_marks = list(marks(**kwargs)) if marks is not None else []
        if j not in fast:
            case_marks.append(pytest.mark.slow)
        params.append(pytest.param(*kwargs.values(), id="-".join(label(n, v, labels) for n, v in kwargs.items()),
                                   marks=case_marks))
    return ",".join(names), params


def listed(names: Sequence[str], rows: Sequence[tuple], more: Mapping[str, Sequence] | None = None,
           **options) -> tuple[str, list]:
    """``grid`` over hand-picked combinations: ``rows`` (tuples of values of ``names``), each times every
    combination of ``more``; the covering subset covers every value the rows and ``more`` hold.
    ``options`` go to ``grid`` (``labels``, ``marks``)."""
    keep = {tuple(row) for row in rows}
    dims = {name: list(dict.fromkeys(row[i] for row in rows)) for i, name in enumerate(names)}
    return grid({**dims, **(more or {})}, where=lambda **combo: tuple(combo[n] for n in names) in keep, **options)
