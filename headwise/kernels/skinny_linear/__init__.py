"""``skinny_linear`` op: ``y = x @ W^T + b`` for the few rows of a decode step (memory-bound).

``skinny_linear(x, weight, bias=None, backend="auto")``: ``naive`` (fp32 reference), ``native``
(C kernel built on first use, streams each weight once; ``auto`` picks it for CPU inputs it
supports, else the naive path, which is torch's own GEMM). The engine routes a decode step's
linear layers here (``engine.runner.SkinnyLinearMode``).
"""

from __future__ import annotations

import torch

from .. import pick_backend
from . import naive, native

BACKENDS = {"naive": naive.skinny_linear, "native": native.skinny_linear}
AUTO_ORDER = [("native", lambda device: device.type == "cpu" and native.available()), ("naive", lambda device: True)]


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """``[..., I]`` rows times ``weight [O, I]``^T (+ ``bias [O]``) -> ``[..., O]``; see ``naive``."""
    fn = pick_backend("skinny_linear", BACKENDS, AUTO_ORDER, backend, x.device)
    return fn(x, weight, bias)


__all__ = ["skinny_linear", "BACKENDS", "AUTO_ORDER"]
