"""``softplus`` head spec: softplus (or exp) attention with a length scale and re-weighting (LSSA / LSSAR).

Softmax split into a non-linearity and an l1 normalisation (Gao & Spratling, "Softplus Attention
with Re-weighting Boosts Length Extrapolation"): the non-linearity becomes ``softplus`` (or stays
``exp``), the scores get a length-dependent factor ``m(n)``, and the re-weighting
``ReLU(n A - 1)^p``, renormalised, sharpens every row. The math is ``kernels/softplus/naive.py``.

The head reads a normal KV cache, chosen like a ``window`` head's: the first ``sink`` tokens and
the last ``span(N) = clamp(floor(alpha + beta N), 1, N)``; the defaults (``sink 0, alpha 0,
beta 1``) read everything, so a softplus head keeps what a dense head keeps and a plan composes it
with a window by setting those fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...errors import PlanError
from ..base import HeadSpec
from ..rules import SinkSpanRule, check_number

NONLINEARITIES = ("softplus", "exp")
#: ``none``: m = temperature; ``log``: m = temperature * log(n) / log(scale_length) (LSSA's log-length
#: factor, 1 at n = scale_length); ``log_floor``: m = temperature * max(1, log(n) / log(scale_length))
#: (rows up to scale_length unchanged: the fine-tuning-free form for a softmax-trained model).
SCALE_RULES = ("none", "log", "log_floor")
#: Largest re-weighting power accepted (p = 64 already keeps only weights within ~1% of the row's top).
MAX_POWER = 64.0


@dataclass(frozen=True)
class Softplus(SinkSpanRule, HeadSpec):
    """One KV head of softplus / exp attention with a length scale and optional re-weighting.

    Fields:
        nonlinearity: ``"softplus"`` (LSSA) or ``"exp"`` (softmax; with ``power > 0`` re-weighting
            alone on a softmax head).
        scale: the length-scale rule, one of ``SCALE_RULES``; ``n`` is the row's readable keys.
        scale_length: the length ``L`` the ``log n`` factor is relative to (rules ``log``,
            ``log_floor``): e.g. the model's trained context.
        temperature: constant factor of the scale (> 0); 1 keeps the model's own scores.
        power: re-weighting power ``p`` (0: no re-weighting).
        sink, alpha, beta: the KV the head reads and keeps, as a ``window`` head's (``beta = 1``,
            ``alpha = 0``: everything).
    """

    kind: ClassVar[str] = "softplus"
    nonlinearity: str = "softplus"
    scale: str = "log_floor"
    scale_length: int = 8192
    temperature: float = 1.0
    power: float = 0.0
    sink: int = 0
    alpha: float = 0.0
    beta: float = 1.0

    @property
    def log_ref(self) -> float:
        """``log(scale_length)``, 0 for the rule ``none`` (no log factor)."""
        return 0.0 if self.scale == "none" else math.log(self.scale_length)

    @property
    def log_floor(self) -> float:
        """Lower bound of ``log(n) / log(scale_length)``: 1 for ``log_floor``, 0 otherwise."""
        return 1.0 if self.scale == "log_floor" else 0.0

    def validate(self, where: str, max_length: int | None = None) -> None:
        if self.nonlinearity not in NONLINEARITIES:
            raise PlanError(f"{where}: field 'nonlinearity' must be one of {list(NONLINEARITIES)}, "
                            f"got {self.nonlinearity!r}.")
        if self.scale not in SCALE_RULES:
            raise PlanError(f"{where}: field 'scale' must be one of {list(SCALE_RULES)}, got {self.scale!r}.")
        check_number(where, "scale_length", self.scale_length, minimum=2, integer=True)
        check_number(where, "temperature", self.temperature)
        if self.temperature <= 0:
            raise PlanError(f"{where}: field 'temperature' must be above 0, got {self.temperature!r}.")
        check_number(where, "power", self.power, minimum=0.0, maximum=MAX_POWER)
        self.validate_rule(where, max_length)


def example(info, weights: str) -> Softplus:
    """An LSSAR head: softplus, log length scale, re-weighting (contract tests)."""
    return Softplus(nonlinearity="softplus", scale="log", scale_length=16, power=3.0)
