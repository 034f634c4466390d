"""``window`` head spec: sink + local window (StreamingLLM when fixed, MoA's elastic span when it grows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import PlanError
from ..base import HeadSpec
from ..rules import SinkSpanRule, check_number


@dataclass(frozen=True)
class Window(SinkSpanRule, HeadSpec):
    """Sink + local window: the first ``sink`` tokens and the last ``span(N)`` tokens.

    ``span(N) = clamp(floor(alpha + beta * N), max(1, min_span), N)``; ``beta = 0`` is StreamingLLM,
    ``beta > 0`` MoA's elastic span; ``min_span`` (optional in the JSON, 0: none) keeps an elastic
    span from shrinking below a floor on short inputs.
    """

    kind: ClassVar[str] = "window"
    optional_fields: ClassVar[frozenset[str]] = frozenset({"min_span"})
    sink: int = 0
    alpha: float = 0.0
    beta: float = 0.0
    min_span: int = 0

    def validate(self, where: str, max_length: int | None = None) -> None:
        self.validate_rule(where, max_length)


def uniform(info, density: float, sink: int = 64, length: int | None = None) -> Window:
    """The StreamingLLM baseline head of ``Plan.uniform``: ``sink`` tokens plus one local window.

    With ``length=None`` the window keeps exactly ``density * N`` tokens at every length ``N``
    (``alpha = -sink, beta = density``); with ``length`` it is a fixed ``density * length - sink``
    tokens (``beta = 0``), the classic StreamingLLM cache.
    """
    check_number("uniform plan", "density", density, minimum=0.0, maximum=1.0)
    check_number("uniform plan", "sink", sink, minimum=0, integer=True)
    if density == 0.0:
        raise PlanError("uniform plan: density must be above 0; use a positive fraction such as 0.25.")
    if length is None:
        return Window(sink=int(sink), alpha=float(-sink), beta=float(density))
    check_number("uniform plan", "length", length, minimum=1, integer=True)
    return Window(sink=int(sink), alpha=float(max(1.0, density * length - sink)), beta=0.0)


def example(info, weights: str) -> Window:
    """A head with a sink, an elastic window and a span floor (contract tests)."""
    return Window(sink=2, alpha=-3.0, beta=0.125, min_span=5)


#: plan presets (``Plan.preset`` / ``"uniform:<density>[:<sink>]"`` plan specs)
PRESETS = {"uniform": uniform}
