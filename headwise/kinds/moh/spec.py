"""``moh`` head spec: Mixture-of-Head routing, a KV head whose query heads are experts a router picks per token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...errors import PlanError
from ..base import HeadSpec
from ..rules import KVRule, SinkSpanRule, check_number

if TYPE_CHECKING:
    from ...plan import ModelInfo


@dataclass(frozen=True)
class MoH(SinkSpanRule, HeadSpec):
    """One KV head in a layer's routed pool (Mixture-of-Head attention, Jin et al. 2024).

    The ``moh`` heads of a layer form its *routed pool*: their query heads are experts, and per
    token a router picks ``top_k`` of the pool's query heads to run (the layer's other heads, of
    any other kind, are the *shared* heads that always run). A selected head's output is its
    attention with weight 1; a routed-out head does no attention work and outputs its fitted mean
    output instead (the calibration mean of that query head's attention output, so the layer output
    stays close to dense without retraining). The router is linear in the RoPE-invariant pair
    magnitudes ``sqrt(q_i^2 + q_{i+D/2}^2)`` of the pool's queries, fitted by ``headwise fit moh``.

    The KV a head keeps and reads is a softmax rule like ``window``'s: the first ``sink`` tokens and
    the last ``span(N) = clamp(floor(alpha + beta*N), 1, N)``; the defaults (0, 0, 1) read
    everything (dense). Every token's KV is written, routed out or not (later tokens may route to it).

    Fields:
        top_k: query heads of the layer's pool that run per token; every ``moh`` head of a layer
            states the same value (at most the pool's query heads; equal to it: every head runs).
        sink, alpha, beta: the KV rule (as ``window``).
        weights: name prefix of this head's tensors in the plan's safetensors file:
            ``<weights>.router`` ``[G * D/2, H]`` (this KV head's query features -> router score of
            every query head of the layer; columns outside the pool are unused), ``<weights>.bias``
            ``[G]`` and ``<weights>.fill`` ``[G, D]`` (the mean output of each of its query heads).
    """

    kind: ClassVar[str] = "moh"
    top_k: int = 1
    sink: int = 0
    alpha: float = 0.0
    beta: float = 1.0
    weights: str = ""

    @property
    def reads_everything(self) -> bool:
        """The KV rule is dense: ``span(N) = N`` at every ``N``."""
        return self.sink == 0 and self.alpha >= 0.0 and self.beta == 1.0

    def kv_rule(self) -> KVRule:
        return KVRule(self.sink, self.alpha, self.beta, self.reads_everything)

    @classmethod
    def plan_summary(cls, plan) -> str:
        """``moh heads: 80 of 90; top_k per layer: [...]; query heads run per token: 202 of 270 (74.8%)``"""
        info = plan.model
        G = info.num_heads // info.num_kv_heads
        top_k, run = [], 0
        for layer in plan.layers:
            pool = [h for h in layer if isinstance(h, cls)]
            run += (len(layer) - len(pool)) * G + (pool[0].top_k if pool else 0)
            if pool:
                top_k.append(pool[0].top_k)
        total = info.num_layers * info.num_heads
        count = sum(isinstance(h, cls) for h in plan.heads)
        return (f"moh heads: {count} of {len(plan.heads)}; top_k per layer: {top_k} (layers with moh heads); "
                f"query heads run per token: {run} of {total} ({run / total:.1%})")

    def required_weights(self, info: "ModelInfo", layer: int, head: int) -> dict[str, tuple[int, ...]]:
        group = info.num_heads // info.num_kv_heads
        return {f"{self.weights}.router": (group * (info.head_dim // 2), info.num_heads),
                f"{self.weights}.bias": (group,), f"{self.weights}.fill": (group, info.head_dim)}

    def validate(self, where: str, max_length: int | None = None) -> None:
        check_number(where, "top_k", self.top_k, minimum=1, integer=True)
        self.validate_rule(where, max_length)
        if not isinstance(self.weights, str) or not self.weights:
            raise PlanError(f"{where}: field 'weights' must name the head's router tensors in the plan's safetensors "
                            f"file, got {self.weights!r}.")


def example(info, weights: str) -> MoH:
    """A moh head whose layer pool routes all but one of its query heads (contract tests)."""
    group = info.num_heads // info.num_kv_heads
    return MoH(top_k=max(1, group - 1), weights=weights)
