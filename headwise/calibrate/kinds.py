"""Which head kinds the calibrator chooses among and which ``headwise fit`` can fit, from the kind
descriptors (``Kind.candidates``, ``Kind.fit``; ``headwise.kinds.registry``).

A candidates function is ``candidates(lengths, *, sink, alpha_step, min_span, guard, floor) -> list[HeadSpec]``
(``floor``: one of ``SPAN_FLOORS``, how ``min_span`` holds; kinds without spans ignore the settings):
heads whose attention is softmax over exactly the keys their ``kv_rule()`` keeps, which is how the
calibrator scores and profiles them. A fit module has ``HELP: str``, ``add_arguments(parser)`` and
``run(args) -> int`` (``headwise fit <kind>``), plus plain functions over captured data.
"""

from __future__ import annotations

from types import ModuleType

from ..kinds import registry

#: how the calibrator's ``--min-span`` holds: ``clamp`` in each window's rule (v3), or ``candidate``:
#: candidates below it at the guard length are left out (v1/v2)
SPAN_FLOORS = ("clamp", "candidate")


def candidate_kinds() -> tuple[str, ...]:
    """Kinds whose heads the calibrator may choose (``Kind.candidates`` set), by name."""
    return tuple(k.name for k in registry.all_kinds() if k.candidates is not None)


def candidates(lengths: list[int], **settings) -> list:
    """Every candidate kind's candidates at ``lengths``: heads that keep part of the context first (in
    kind order), then those that keep everything, so a plan's tie-breaks do not depend on kind names."""
    heads = [head for name in candidate_kinds() for head in registry.get(name).candidate_heads(lengths, **settings)]
    return [h for h in heads if not h.keeps_everything] + [h for h in heads if h.keeps_everything]


def fit_kinds() -> tuple[str, ...]:
    """Kinds with a ``headwise fit <kind>`` command."""
    return tuple(k.name for k in registry.all_kinds() if k.fit is not None)


def fit_module(kind: str) -> ModuleType:
    """The fit module of ``kind``; one sentence when the kind has none."""
    if kind not in fit_kinds():
        raise ValueError(f"no fitting for head kind {kind!r}; kinds with fitting: {', '.join(fit_kinds())}.")
    return registry.get(kind).fit_module()
