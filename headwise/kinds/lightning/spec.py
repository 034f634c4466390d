"""``lightning`` head spec: decayed linear attention with a fitted feature map (no growing KV)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..base import HeadSpec
from ..rules import FittedLinearPart

if TYPE_CHECKING:
    from ...plan import ModelInfo


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
    keeps_kv: ClassVar[bool] = False
    decay: float = 1.0
    feature_dim: int = 128
    weights: str = ""

    def kept(self, n: int) -> int:
        return 0

    def kv_rule(self) -> tuple[int, float, float, bool]:
        return 0, 1.0, 0.0, False          # the HF cache holds the current token only

    def required_weights(self, info: "ModelInfo", layer: int, head: int) -> dict[str, tuple[int, ...]]:
        return self.linear_weights(info)

    def validate(self, where: str, max_length: int | None = None) -> None:
        self.validate_linear(where)


def example(info, weights: str) -> Lightning:
    """A lightning head with a small feature map (contract tests; its tensors are ``required_weights``)."""
    return Lightning(decay=0.9, feature_dim=8, weights=weights)
