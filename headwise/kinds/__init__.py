"""Head kinds: each kind is one folder that owns its spec, its attention, its engine group and its fitting.

A kind folder ``headwise/kinds/<kind>/`` holds ``__init__.py`` with ``KIND = Kind(...)`` (the
descriptor, ``headwise.kinds.base``), ``spec.py`` (the plan JSON fields), and the code the
descriptor names: attention under ``patch_model``, the engine group, ``fit.py`` for
``headwise fit <kind>``, calibrator candidates. ``headwise.kinds.registry`` finds the folders, so a
new kind is a new folder and nothing else. Shared pieces live beside the folders: ``rules.py``
(sink + span rule, fitted linear part), ``softmax.py`` (softmax over kept KV, dense attention),
``hedgehog.py`` (feature maps), ``call.py`` (the runtime contract), ``kv_rule.py``, ``layer.py``.
See docs/design.md, "Head kinds".
"""

from .base import HeadSpec, Kind
from .registry import all_kinds, get, kind_of, register_kind

__all__ = ["HeadSpec", "Kind", "all_kinds", "get", "kind_of", "register_kind"]
