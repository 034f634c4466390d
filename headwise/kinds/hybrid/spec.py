"""``hybrid`` head spec: sink + short exact softmax window + decayed linear attention over every older key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...errors import PlanError
from ..base import HeadSpec
from ..rules import FittedLinearPart, check_number

if TYPE_CHECKING:
    from ...plan import ModelInfo


@dataclass(frozen=True)
class Hybrid(FittedLinearPart, HeadSpec):
    """One KV head as LoLCATs-style hybrid attention: exact softmax over the first ``sink`` keys and
    the last ``window`` keys (the query itself included), and decayed linear attention with fitted
    Hedgehog feature maps over every key in between, in one normalisation::

        o_t = (sum_{s in E_t} exp(a_s - m_t) v_s + mu sum_{s in L_t} lambda^(t-s) phi_q(q_t).phi_k(k_s) v_s)
              / (sum_{s in E_t} exp(a_s - m_t)     + mu sum_{s in L_t} lambda^(t-s) phi_q(q_t).phi_k(k_s))

    ``E_t = {s < sink} u {t - window < s <= t}``, ``L_t = {sink <= s <= t - window}``,
    ``a_s = scale q_t.k_s``, ``m_t = max_{E_t} a_s``, ``mu = exp(log_mix)`` one per query head.
    At ``t < sink + window`` no key is old enough and the head is exactly softmax attention.

    Decode state: the KV of the sink and ``window + 1`` recent keys (the extra slot holds the key
    that leaves the window at the next step until it is folded into the state), plus a
    ``feature_dim x (head_dim + 1)`` fp32 recurrent state (the ``+1`` column is the normaliser).

    Fields:
        sink, window: exact keys kept at the start and at the end (``window >= 1``).
        decay: ``lambda`` in ``(0, 1]``; feature_dim: features per map (even).
        weights: name prefix of the head's tensors in the plan's safetensors file:
            ``<weights>.q`` ``[G, head_dim, feature_dim/2]``, ``<weights>.k`` ``[head_dim, feature_dim/2]``,
            ``<weights>.log_mix`` ``[G]``.
    """

    kind: ClassVar[str] = "hybrid"
    sink: int = 0
    window: int = 64
    decay: float = 1.0
    feature_dim: int = 128
    weights: str = ""

    def kept(self, n: int) -> int:
        return min(n, self.sink + self.window + 1)

    def kv_rule(self) -> tuple[int, float, float, bool]:
        return self.sink, float(self.window + 1), 0.0, False      # one slot past the window: see the docstring

    def required_weights(self, info: "ModelInfo", layer: int, head: int) -> dict[str, tuple[int, ...]]:
        group = info.num_heads // info.num_kv_heads
        return {**self.linear_weights(info), f"{self.weights}.log_mix": (group,)}

    def validate(self, where: str, max_length: int | None = None) -> None:
        check_number(where, "sink", self.sink, minimum=0, integer=True)
        check_number(where, "window", self.window, minimum=1, integer=True)
        self.validate_linear(where)
        if max_length is not None and self.sink + self.window >= max_length:
            raise PlanError(f"{where}: sink {self.sink} + window {self.window} must be shorter than the model's context "
                            f"of {max_length} tokens (the head would never use its linear part).")


def example(info, weights: str) -> Hybrid:
    """A hybrid head with a short window (contract tests; its tensors are ``required_weights``)."""
    return Hybrid(sink=2, window=4, decay=0.9, feature_dim=8, weights=weights)
