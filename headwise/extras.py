"""Optional dependencies (``pip install 'headwise[<extra>]'``): found on use, refused in one sentence.

Core paths (``patch_model``, the engine, the embedded model) need none of them:

- ``calibrate``: scipy, for the calibrator's MILP (``headwise calibrate``);
- ``plot``: matplotlib, for heatmaps (``headwise plan show``, ``headwise calibrate``) and eval plots;
- ``eval``: lm-eval; ``triton``: GPU kernels; ``vllm``: the vLLM plugin; ``test``: the test suite.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import HeadwiseError

#: import name -> (distribution, extra)
EXTRAS = {"scipy": ("scipy", "calibrate"), "matplotlib": ("matplotlib", "plot")}


class MissingExtraError(HeadwiseError, ImportError):
    """An optional dependency a feature needs is not installed."""


def require(module: str, use: str) -> ModuleType:
    """Import ``module`` (e.g. ``"scipy.optimize"``) or raise ``MissingExtraError`` naming the extra.

    ``use`` says what needs it, as a sentence's subject: ``"headwise calibrate"``.
    """
    top = module.split(".")[0]
    try:
        importlib.import_module(top)
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != top and not (error.name or "").startswith(top + "."):
            raise
        dist, extra = EXTRAS.get(top, (top, None))
        how = f"pip install 'headwise[{extra}]'" if extra else f"pip install {dist}"
        raise MissingExtraError(f"{use} needs {dist}, which is not installed; install it with: {how}.") from None


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module.split(".")[0]) is not None


__all__ = ["EXTRAS", "MissingExtraError", "require", "available"]
