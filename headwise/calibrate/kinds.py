"""Which head kinds the calibrator chooses among and which ``headwise fit`` can fit: the one place
that names them outside the kind folders.

TODO(issue 25 part 1, the ``Kind`` descriptor): when ``headwise.kinds.registry`` lands, read both
from the descriptors (``Kind.fit`` for ``FIT``, a ``Kind.candidates`` function for
``CANDIDATES``) and delete these tables.

A candidates module has ``candidates(lengths, *, sink, alpha_step, min_span, guard) -> list[HeadSpec]``:
heads whose attention is softmax over exactly the keys their ``kv_rule()`` keeps, which is how the
calibrator scores and profiles them. A fit module has ``HELP: str``, ``add_arguments(parser)`` and
``run(args) -> int`` (``headwise fit <kind>``), plus plain functions over captured data.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: kind -> module whose ``candidates(...)`` the calibrator offers every head (in this order)
CANDIDATES = {"window": "headwise.kinds.window.candidates", "dense": "headwise.kinds.dense.candidates"}

#: kind -> module of ``headwise fit <kind>``
FIT = {"lightning": "headwise.kinds.lightning.fit", "hybrid": "headwise.kinds.hybrid.fit",
       "moh": "headwise.kinds.moh.fit", "softplus": "headwise.kinds.softplus.fit"}


def candidate_kinds() -> tuple[str, ...]:
    return tuple(CANDIDATES)


def candidates(lengths: list[int], **settings) -> list:
    """Every candidate kind's candidates at ``lengths``, concatenated in ``CANDIDATES`` order."""
    return [head for name in CANDIDATES for head in importlib.import_module(CANDIDATES[name]).candidates(
        lengths, **settings)]


def fit_kinds() -> tuple[str, ...]:
    return tuple(FIT)


def fit_module(kind: str) -> ModuleType:
    """The fit module of ``kind``; one sentence when the kind has none."""
    if kind not in FIT:
        raise ValueError(f"no fitting for head kind {kind!r}; kinds with fitting: {', '.join(FIT)}.")
    return importlib.import_module(FIT[kind])
