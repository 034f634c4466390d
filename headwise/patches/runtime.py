"""Per-model state of a patch: the plan as tensors, and what the current forward is about."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..plan import Dense, HeadSpec, Plan, PlanError, Window


@dataclass
class ForwardInfo:
    """Real (padding-free) positions of one forward pass.

    ``query_pos``: ``[B, q]`` int64 position of each new token in its own sequence, -1 for padding.
    ``key_pos``: ``[B, T]`` int64 the same for every token seen so far (past and new).
    ``lengths``: ``[B]`` int64 real tokens of each sequence after this forward.
    """

    query_pos: torch.Tensor
    key_pos: torch.Tensor
    lengths: torch.Tensor


def forward_info(attention_mask: torch.Tensor | None, batch_size: int, q_length: int, q_offset: int,
                 device: torch.device) -> ForwardInfo:
    """Positions from HF's 2D padding mask ``[B, q_offset + q_length]`` (or none: no padding)."""
    if attention_mask is None:
        key_pos = torch.arange(q_offset + q_length, device=device).expand(batch_size, -1)
    else:
        if attention_mask.dim() != 2:
            raise ValueError(f"headwise needs a 2D padding mask [batch, tokens], got shape {tuple(attention_mask.shape)}; "
                             "pass the tokenizer's attention_mask instead of a prepared 4D mask.")
        valid = attention_mask.to(device=device, dtype=torch.bool)
        key_pos = torch.where(valid, valid.long().cumsum(-1) - 1, -1)
    key_pos = key_pos.long()
    lengths = key_pos.max(dim=-1).values + 1
    return ForwardInfo(query_pos=key_pos[:, -q_length:], key_pos=key_pos, lengths=lengths)


@dataclass
class LayerRule:
    """The sink/span rule of one layer's KV heads as tensors (``Hkv`` entries each)."""

    sink: torch.Tensor     # [Hkv] int64
    alpha: torch.Tensor    # [Hkv] float64
    beta: torch.Tensor     # [Hkv] float64
    dense: torch.Tensor    # [Hkv] bool
    _on: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.all_dense = bool(self.dense.all())

    @classmethod
    def from_heads(cls, heads: tuple[HeadSpec, ...]) -> "LayerRule":
        for h in heads:
            if h.family != "sink_window":
                raise PlanError(f"head kind {h.kind!r} has no attention implementation in this version of headwise.")
        return cls(
            sink=torch.tensor([h.sink if isinstance(h, Window) else 0 for h in heads], dtype=torch.long),
            alpha=torch.tensor([h.alpha if isinstance(h, Window) else 0.0 for h in heads], dtype=torch.float64),
            beta=torch.tensor([h.beta if isinstance(h, Window) else 0.0 for h in heads], dtype=torch.float64),
            dense=torch.tensor([isinstance(h, Dense) for h in heads], dtype=torch.bool),
        )

    def to(self, device: torch.device) -> "LayerRule":
        if device not in self._on:
            self._on[device] = LayerRule(self.sink.to(device), self.alpha.to(device), self.beta.to(device),
                                         self.dense.to(device))
        return self._on[device]

    def span(self, lengths: torch.Tensor) -> torch.Tensor:
        """``[B]`` lengths -> ``[B, Hkv]`` spans, ``clamp(floor(alpha + beta*N), 1, N)``; dense: ``N``."""
        n = lengths.to(torch.float64)[:, None]
        span = torch.floor(self.alpha + self.beta * n).clamp(min=1.0)
        span = torch.minimum(span, n).clamp(min=1.0)
        return torch.where(self.dense, n, span).long()


class Runtime:
    """What a patched model needs at run time; one per patched model."""

    def __init__(self, plan: Plan, target_length: int | None, backend: str, prefill: str | None = None):
        self.plan = plan
        self.prefill = plan.prefill if prefill is None else prefill   # "sparse" | "dense": forwards of > 1 query
        self.rules = [LayerRule.from_heads(layer) for layer in plan.layers]
        self.target_length = target_length
        self.backend = backend
        self.current: ForwardInfo | None = None
        self.key_pos: dict[int, torch.Tensor] = {}

    def begin_forward(self, info: ForwardInfo) -> None:
        self.current = info
        self.key_pos = {}

    def effective_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """``N`` used by span rules: the sequence's target length when set, else its real length."""
        if self.target_length is None:
            return lengths
        return lengths.clamp(min=int(self.target_length))

    def forward(self) -> ForwardInfo:
        if self.current is None:
            raise RuntimeError("headwise attention ran before its mask function; call the patched model itself "
                               "(model(...) or model.generate(...)), not its attention modules directly.")
        return self.current


_RUNTIMES: "weakref.WeakValueDictionary[int, Runtime]" = weakref.WeakValueDictionary()


def runtime_for(config) -> Runtime:
    """The runtime of the patched model that owns ``config``."""
    runtime = _RUNTIMES.get(id(config))
    if runtime is None:
        raise RuntimeError("this model runs attention 'headwise' but was not patched by headwise.patch_model; "
                           "call patch_model(model, plan) instead of set_attn_implementation('headwise').")
    return runtime
