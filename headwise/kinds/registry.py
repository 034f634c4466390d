"""The one registry of head kinds.

Kinds are found, not listed: every sub-package of ``headwise.kinds`` (every folder on its
``__path__``) whose ``__init__`` defines ``KIND`` is a kind, and so is every ``Kind`` an installed
package exposes under the entry-point group ``headwise.kinds``. ``register_kind`` adds one by hand.
Finding a kind imports only its folder's ``__init__`` (spec + descriptor), never its attention.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

from ..errors import PlanError
from .base import HeadSpec, Kind

_KINDS: dict[str, Kind] = {}
_scanned: set[str] = set()
_entry_points_read = False


def register_kind(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (a second, different kind under the same name is refused)."""
    if not isinstance(kind, Kind):
        raise TypeError(f"register_kind takes a headwise.kinds.Kind, got {type(kind).__name__}.")
    known = _KINDS.get(kind.name)
    if known is not None and known != kind:
        raise ValueError(f"head kind {kind.name!r} is registered twice; give each kind a unique name.")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove the kind ``name`` (tests and plugins that add a kind for a while); a folder kind comes
    back on the next lookup only if its package is imported again."""
    _KINDS.pop(name, None)


def _scan() -> None:
    """Import kind folders not imported yet (and, once, the entry points)."""
    global _entry_points_read
    from . import __path__ as kind_path, __name__ as package

    for module in sorted(pkgutil.iter_modules(kind_path), key=lambda m: m.name):
        name = f"{package}.{module.name}"
        if not module.ispkg or name in _scanned:
            continue
        _scanned.add(name)
        kind = getattr(importlib.import_module(name), "KIND", None)
        if kind is not None:
            register_kind(kind)
    if not _entry_points_read:
        _entry_points_read = True
        for entry in importlib.metadata.entry_points(group="headwise.kinds"):
            register_kind(entry.load())


def all_kinds() -> list[Kind]:
    """Every known kind, sorted by name."""
    _scan()
    return [_KINDS[name] for name in sorted(_KINDS)]


def get(name: str, where: str = "plan") -> Kind:
    """The kind named ``name``; ``PlanError`` with the known names when there is none."""
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        _scan()
        kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise PlanError(f"{where}: unknown head kind {name!r}; known kinds are {sorted(_KINDS)}.")
    return kind


def kind_of(spec: HeadSpec) -> Kind:
    """The descriptor of a head spec."""
    return get(spec.kind)


def preset(name: str) -> tuple[Kind, object] | None:
    """``(kind, constructor)`` of the plan preset ``name`` (``None`` when no kind provides it)."""
    for kind in all_kinds():
        constructor = kind.plan_presets().get(name)
        if constructor is not None:
            return kind, constructor
    return None
