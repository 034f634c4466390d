"""Which KV every head of a layer keeps, as tensors: the sink/span rule the cache and softmax kernels share.

Every head spec states its rule with ``HeadSpec.kv_rule()`` -> ``(sink, alpha, beta, dense[, min_span])``: a
``window`` head its own, a ``dense`` head everything, a kind with no softmax part (``lightning``)
one slot (the current token, so the rectangular HF cache stays uniform).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import HeadSpec
from .rules import as_rule


@dataclass
class LayerRule:
    """The sink/span rule of one layer's KV heads as tensors (``Hkv`` entries each)."""

    sink: torch.Tensor     # [Hkv] int64
    alpha: torch.Tensor    # [Hkv] float64
    beta: torch.Tensor     # [Hkv] float64
    dense: torch.Tensor    # [Hkv] bool
    min_span: torch.Tensor | None = None   # [Hkv] float64 span floor (None: zeros)
    _on: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.min_span is None:
            self.min_span = torch.zeros(self.sink.shape[0], dtype=torch.float64, device=self.sink.device)
        self.all_dense = bool(self.dense.all())

    @classmethod
    def from_heads(cls, heads: tuple[HeadSpec, ...]) -> "LayerRule":
        rules = [as_rule(h.kv_rule()) for h in heads]
        return cls(
            sink=torch.tensor([r.sink for r in rules], dtype=torch.long),
            alpha=torch.tensor([r.alpha for r in rules], dtype=torch.float64),
            beta=torch.tensor([r.beta for r in rules], dtype=torch.float64),
            dense=torch.tensor([r.dense for r in rules], dtype=torch.bool),
            min_span=torch.tensor([r.min_span for r in rules], dtype=torch.float64),
        )

    def to(self, device: torch.device) -> "LayerRule":
        if device not in self._on:
            self._on[device] = LayerRule(self.sink.to(device), self.alpha.to(device), self.beta.to(device),
                                         self.dense.to(device), self.min_span.to(device))
        return self._on[device]

    def as_dense(self) -> "LayerRule":
        """The same heads, every one reading everything (a dense prefill)."""
        n = self.sink.shape[0]
        return LayerRule(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.float64),
                         torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.bool))

    def select(self, heads: list[int]) -> "LayerRule":
        """The rule of KV heads ``heads`` only."""
        index = torch.tensor(heads, dtype=torch.long)
        return LayerRule(self.sink[index], self.alpha[index], self.beta[index], self.dense[index],
                         self.min_span[index])

    def span(self, lengths: torch.Tensor) -> torch.Tensor:
        """``[B]`` lengths -> ``[B, Hkv]`` spans, ``clamp(floor(alpha + beta*N), max(1, min_span), N)``;
        dense: ``N``."""
        n = lengths.to(torch.float64)[:, None]
        span = torch.maximum(torch.floor(self.alpha + self.beta * n), self.min_span).clamp(min=1.0)
        span = torch.minimum(span, n).clamp(min=1.0)
        return torch.where(self.dense, n, span).long()
