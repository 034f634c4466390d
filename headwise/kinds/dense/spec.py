"""``dense`` head spec: full causal attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...plan import HeadSpec, register_head_kind


@register_head_kind
@dataclass(frozen=True)
class Dense(HeadSpec):
    """Full causal attention (a window whose span is always ``N``)."""

    kind: ClassVar[str] = "dense"
    family: ClassVar[str] = "sink_window"

    def kept(self, n: int) -> int:
        return n

    def kv_rule(self) -> tuple[int, float, float, bool]:
        return 0, 0.0, 0.0, True
