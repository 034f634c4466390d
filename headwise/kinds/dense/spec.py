"""``dense`` head spec: full causal attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..base import HeadSpec


@dataclass(frozen=True)
class Dense(HeadSpec):
    """Full causal attention (a window whose span is always ``N``)."""

    kind: ClassVar[str] = "dense"

    def kept(self, n: int) -> int:
        return n

    def kv_rule(self) -> tuple[int, float, float, bool]:
        return 0, 0.0, 0.0, True


def dense(info) -> Dense:
    """The head of ``Plan.dense``: every head dense, so the patched model computes what the unpatched one does."""
    return Dense()


def example(info, weights: str) -> Dense:
    """A dense head (contract tests)."""
    return Dense()


#: plan presets (``Plan.preset`` / the ``"dense"`` plan spec)
PRESETS = {"dense": dense}
