"""Attention kernels, one folder per op: ``naive.py`` (reference), ``cpu.py``, ``triton.py``.

Every op exposes ``<op>(..., backend="auto")``; ``pick_backend`` resolves the name and logs the
backend that actually runs (once per op and device).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Callable

import torch

logger = logging.getLogger("headwise.kernels")
# Every backend name some op implements ("native": the C kernels of paged_decode and skinny_linear).
BACKEND_NAMES = ("auto", "cpu", "naive", "native", "triton")
_announced: set[tuple[str, str, str]] = set()


def pick_backend(op: str, backends: dict[str, Callable], auto_order: list[tuple[str, Callable]],
                 backend: str, device: torch.device) -> Callable:
    """Resolve ``backend`` ("auto" or a name in ``backends``) for tensors on ``device``."""
    if backend == "auto":
        backend = next(name for name, runs_on in auto_order if runs_on(device))
    elif backend not in backends:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {['auto', *backends]}.")
    key = (op, backend, device.type)
    if key not in _announced:
        _announced.add(key)
        logger.info("%s: running the %s backend on %s", op, backend, device.type)
    return backends[backend]


def check_backend(backend: object) -> str:
    """``backend`` if some op knows that name, else ``InputError`` (checked where a user passes it, not per call)."""
    from ..errors import InputError

    if backend not in BACKEND_NAMES:
        raise InputError(f"backend must be one of {list(BACKEND_NAMES)}, got {backend!r}.")
    return backend


def triton_available() -> bool:
    """Whether the optional ``triton`` package is installed (not imported here)."""
    return importlib.util.find_spec("triton") is not None


def lazy_backend(module: str, function: str) -> Callable:
    """A backend that imports ``module`` (e.g. a Triton file) on its first call, not at package import.

    Keeps Triton optional, and lets ``TRITON_INTERPRET=1`` set before the first call take effect
    (Triton reads it when kernels are defined).
    """
    def run(*args, **kwargs):
        if not triton_available():
            raise ImportError(f"{module} needs the optional 'triton' package; install headwise[triton] "
                              "or pick backend='cpu'.")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    run.__name__ = run.__qualname__ = f"lazy_{function}"
    return run


# Preference order for "auto" shared by every op: first entry whose device test passes wins.
AUTO_ORDER: list[tuple[str, Callable]] = [
    ("triton", lambda device: device.type == "cuda" and triton_available()),
    ("cpu", lambda device: True),
]


def standard_backends(package: str, function: str, naive_module, cpu_module) -> dict[str, Callable]:
    """The three backends of an op folder: ``naive`` and ``cpu`` modules, ``triton`` loaded lazily."""
    return {
        "naive": getattr(naive_module, function),
        "cpu": getattr(cpu_module, function),
        "triton": lazy_backend(package + ".triton", function),
    }
