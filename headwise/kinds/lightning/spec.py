"""``lightning`` head spec: decayed linear attention with a fitted feature map (no growing KV)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...plan import HeadSpec, ModelInfo, PlanError, check_number, register_head_kind

#: Bytes per value of the recurrent state (kept in fp32 whatever the model's dtype).
STATE_VALUE_BYTES = 4


class FittedLinearPart:
    """The fitted decayed linear attention of ``lightning`` heads and of ``hybrid`` heads' older keys
    (fields ``decay``, ``feature_dim``, ``weights`` on the dataclass that uses it)."""

    @property
    def log_decay(self) -> float:
        return math.log(self.decay)

    def state_bytes(self, head_dim: int, group_size: int) -> int:
        return self.feature_dim * (head_dim + 1) * STATE_VALUE_BYTES

    def linear_weights(self, info: ModelInfo) -> dict[str, tuple[int, ...]]:
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


@register_head_kind
@dataclass(frozen=True)
class Lightning(FittedLinearPart, HeadSpec):
    """One KV head as causal linear attention with decay ``lambda`` (TransNormerLLM's lightning).

    ``o_t = sum_{s<=t} lambda^(t-s) phi_q(q_t) . phi_k(k_s) v_s / sum_{s<=t} lambda^(t-s) phi_q(q_t) . phi_k(k_s)``
    with Hedgehog feature maps ``phi(x) = [softmax(x W), softmax(-x W)]`` (``feature_dim`` features),
    one ``W`` per query head and one per KV head, fitted to imitate the head's softmax attention
    (``headwise fit lightning``). Decode state per KV head: ``feature_dim x (head_dim + 1)`` fp32 values
    (the ``+1`` column is the normaliser), the same at every length.

    Fields:
        decay: ``lambda`` in ``(0, 1]`` (1 = no decay).
        feature_dim: features per map (even; ``W`` has ``feature_dim / 2`` columns).
        weights: name prefix of this head's tensors in the plan's safetensors file:
            ``<weights>.q`` ``[G, head_dim, feature_dim/2]`` and ``<weights>.k`` ``[head_dim, feature_dim/2]``.
    """

    kind: ClassVar[str] = "lightning"
    family: ClassVar[str] = "lightning"
    fit_command: ClassVar[str] = "headwise fit lightning"
    decay: float = 1.0
    feature_dim: int = 128
    weights: str = ""

    def kept(self, n: int) -> int:
        return 0

    def kv_rule(self) -> tuple[int, float, float, bool]:
        return 0, 1.0, 0.0, False          # the HF cache holds the current token only

    def required_weights(self, info: ModelInfo, layer: int, head: int) -> dict[str, tuple[int, ...]]:
        return self.linear_weights(info)

    def validate(self, where: str, max_length: int | None = None) -> None:
        self.validate_linear(where)
