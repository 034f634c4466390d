"""Head kinds: each kind is one folder that owns its spec, its attention and its decode state (DESIGN §10).

A kind folder ``headwise/kinds/<kind>/`` holds

* ``spec.py``: a ``HeadSpec`` subclass registered with ``@register_head_kind`` (plan JSON fields,
  validation, kept KV / memory at length ``N``, the fitted tensors it needs from the plan's
  safetensors file);
* its attention over the heads of one layer that use it, as a ``KindGroup`` made by the factory
  registered under the spec's ``family`` with ``register_family`` (see ``headwise.kinds.base``).
  Heads of one family in a layer run as one group; the group's kernels live in
  ``headwise/kernels/<op>/`` (naive reference + fast backends);
* its decode state: the KV a softmax kind keeps (``kv_rule``) and, for kinds with other state (a
  linear-attention recurrent state), a ``DecodeState`` the group creates and updates.

``load_builtin_kinds`` imports every sub-package of this folder, so adding a kind is adding a
folder. ``headwise.plan`` calls it once at import; ``LayerKinds`` (``headwise.kinds.layer``) groups a
layer's heads by family, runs each group and scatters outputs back into head order.
"""

from __future__ import annotations

import importlib
import pkgutil

_loaded = False


def load_builtin_kinds() -> None:
    """Import every kind folder under ``headwise/kinds/`` (each registers its spec and family)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.ispkg:
            importlib.import_module(f"{__name__}.{module.name}")
