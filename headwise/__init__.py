"""headwise: cheaper long-context inference of Hugging Face LLMs, one attention head at a time.

The public API is loaded on first use (PEP 562), so ``import headwise.plan`` or the CLI's
``--help`` do not import transformers or the kernels.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "patch_model": "headwise.patches", "unpatch_model": "headwise.patches", "expected_length": "headwise.patches",
    "kv_bytes": "headwise.patches", "patched": "headwise.patches.context", "Plan": "headwise.plan", "load_plan": "headwise.plan",
    "PlanError": "headwise.errors", "load_model": "headwise.models",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'headwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .errors import PlanError
    from .models import load_model
    from .patches import expected_length, kv_bytes, patch_model, unpatch_model
    from .patches.context import patched
    from .plan import Plan, load_plan
