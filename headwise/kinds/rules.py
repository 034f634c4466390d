"""Plan-field rules several head kinds share: number checks, the sink + span rule, the fitted linear part.

Pure Python (no torch): spec classes use these, and ``import headwise.plan`` must stay light.

Span rule of a head that reads a sink and a window (docs/design.md, "The plan")::

    span(N) = clamp(floor(alpha + beta * N), max(1, min_span), N)      kept(N) = min(N, sink + span(N))

``min_span`` (0: none) is a floor at short ``N``: an elastic head (``beta > 0``) keeps at least
``min_span`` recent tokens however short the input, and still ``alpha + beta * N`` at long ``N``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import PlanError

if TYPE_CHECKING:
    from ..plan import ModelInfo

#: Bytes per value of a recurrent state (kept in fp32 whatever the model's dtype).
STATE_VALUE_BYTES = 4


def check_number(where: str, name: str, value: Any, *, minimum: float | None = None,
                 maximum: float | None = None, integer: bool = False) -> None:
    """Raise ``PlanError`` unless ``value`` is a finite number within bounds (``where``: the plan location)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{where}: field {name!r} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise PlanError(f"{where}: field {name!r} must be finite, got {value!r}.")
    if integer and int(value) != value:
        raise PlanError(f"{where}: field {name!r} must be a whole number, got {value!r}.")
    if minimum is not None and value < minimum:
        raise PlanError(f"{where}: field {name!r} must be >= {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise PlanError(f"{where}: field {name!r} must be <= {maximum}, got {value!r}.")


def span_of(alpha: float, beta: float, n: int, min_span: int = 0) -> int:
    """``clamp(floor(alpha + beta * n), max(1, min_span), n)``: the window span at length ``n``
    (float64 math)."""
    return max(1, min(n, max(int(min_span), math.floor(alpha + beta * n))))


class KVRule(NamedTuple):
    """Which KV a head keeps (``HeadSpec.kv_rule()``): the first ``sink`` tokens and the last
    ``span(N)``, or everything when ``dense``; ``min_span`` floors the span at short ``N``."""

    sink: int
    alpha: float
    beta: float
    dense: bool
    min_span: int = 0

    def span(self, n: int) -> int:
        """The recent tokens kept at length ``n`` (``n`` when dense)."""
        return n if self.dense else span_of(self.alpha, self.beta, n, self.min_span)


def as_rule(rule: tuple) -> KVRule:
    """A ``kv_rule()`` result as a ``KVRule``: kinds may return a plain 4-tuple
    ``(sink, alpha, beta, dense)`` (no span floor) or 5 with ``min_span``."""
    return rule if isinstance(rule, KVRule) else KVRule(*rule)


class SinkSpanRule:
    """The KV rule of a softmax head that reads its first ``sink`` tokens and the last ``span(N)``
    (fields ``sink``, ``alpha``, ``beta`` and optionally ``min_span`` on the dataclass that uses it)."""

    #: the span floor; a dataclass field on kinds that have one (``window``)
    min_span = 0

    def span(self, n: int) -> int:
        return span_of(self.alpha, self.beta, n, self.min_span)

    def kept(self, n: int) -> int:
        return min(n, self.sink + self.span(n))

    def kv_rule(self) -> KVRule:
        return KVRule(self.sink, self.alpha, self.beta, False, self.min_span)

    def validate_rule(self, where: str, max_length: int | None = None) -> None:
        check_number(where, "sink", self.sink, minimum=0, integer=True)
        check_number(where, "alpha", self.alpha)
        check_number(where, "beta", self.beta, minimum=0.0, maximum=1.0)
        check_number(where, "min_span", self.min_span, minimum=0, integer=True)
        if max_length is not None and self.min_span > max_length:
            raise PlanError(f"{where}: min_span {self.min_span} must not exceed the model's context of "
                            f"{max_length} tokens.")
        if max_length is not None and self.sink >= max_length:
            raise PlanError(f"{where}: sink {self.sink} must be smaller than the model's context of {max_length} tokens.")
        if max_length is not None and abs(self.alpha) > 4 * max_length:
            raise PlanError(f"{where}: alpha {self.alpha} is far outside the model's context of {max_length} tokens.")


class FittedLinearPart:
    """A fitted decayed linear attention (fields ``decay``, ``feature_dim``, ``weights`` on the
    dataclass that uses it): the whole of a linear head, or the part of a hybrid head over older keys."""

    @property
    def log_decay(self) -> float:
        return math.log(self.decay)

    def state_bytes(self, head_dim: int, group_size: int) -> int:
        return self.feature_dim * (head_dim + 1) * STATE_VALUE_BYTES

    def linear_weights(self, info: "ModelInfo") -> dict[str, tuple[int, ...]]:
        """Shapes of the feature maps' tensors: ``<weights>.q`` ``[G, head_dim, F/2]``, ``<weights>.k`` ``[head_dim, F/2]``."""
        group = info.num_heads // info.num_kv_heads
        half = self.feature_dim // 2
        return {f"{self.weights}.q": (group, info.head_dim, half), f"{self.weights}.k": (info.head_dim, half)}

    def validate_linear(self, where: str) -> None:
        check_number(where, "decay", self.decay)
        if not 0.0 < self.decay <= 1.0:
            raise PlanError(f"{where}: field 'decay' must be in (0, 1], got {self.decay!r}.")
        check_number(where, "feature_dim", self.feature_dim, minimum=2, integer=True)
        if self.feature_dim % 2:
            raise PlanError(f"{where}: field 'feature_dim' must be even (two halves of the map), got {self.feature_dim!r}.")
        if not isinstance(self.weights, str) or not self.weights:
            raise PlanError(f"{where}: field 'weights' must name the head's tensors in the plan's safetensors file, "
                            f"got {self.weights!r}.")
