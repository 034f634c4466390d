"""``window`` head spec: sink + local window (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...plan import HeadSpec, PlanError, check_number, register_head_kind, span_of


class SinkSpanRule:
    """The KV rule of a softmax head that reads its first ``sink`` tokens and the last ``span(N)``
    (fields ``sink``, ``alpha``, ``beta`` on the dataclass that uses it): ``window``, and the kinds
    that read a cache the same way (``softplus``, ``moh``)."""

    def span(self, n: int) -> int:
        return span_of(self.alpha, self.beta, n)

    def kept(self, n: int) -> int:
        return min(n, self.sink + self.span(n))

    def kv_rule(self) -> tuple[int, float, float, bool]:
        return self.sink, self.alpha, self.beta, False

    def validate_rule(self, where: str, max_length: int | None = None) -> None:
        check_number(where, "sink", self.sink, minimum=0, integer=True)
        check_number(where, "alpha", self.alpha)
        check_number(where, "beta", self.beta, minimum=0.0, maximum=1.0)
        if max_length is not None and self.sink >= max_length:
            raise PlanError(f"{where}: sink {self.sink} must be smaller than the model's context of {max_length} tokens.")
        if max_length is not None and abs(self.alpha) > 4 * max_length:
            raise PlanError(f"{where}: alpha {self.alpha} is far outside the model's context of {max_length} tokens.")


@register_head_kind
@dataclass(frozen=True)
class Window(SinkSpanRule, HeadSpec):
    """Sink + local window: first ``sink`` tokens and the last ``span(N)`` tokens.

    ``beta = 0`` is StreamingLLM; ``beta > 0`` is MoA's elastic span ``alpha + beta * N``.
    """

    kind: ClassVar[str] = "window"
    family: ClassVar[str] = "sink_window"
    sink: int = 0
    alpha: float = 0.0
    beta: float = 0.0

    def validate(self, where: str, max_length: int | None = None) -> None:
        self.validate_rule(where, max_length)
