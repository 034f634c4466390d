"""Per-model state of a patch: the plan as tensors, and what the current forward is about."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..kinds.kv_rule import LayerRule
from ..kinds.layer import LayerKinds
from ..plan import Plan

__all__ = ["ForwardInfo", "forward_info", "LayerRule", "Runtime", "runtime_for"]


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
    if q_offset + q_length == 0 or batch_size == 0:
        raise InputError("the input is empty; give every sequence at least one token.")
    if attention_mask is None:
        key_pos = torch.arange(q_offset + q_length, device=device).expand(batch_size, -1)
    else:
        if attention_mask.dim() != 2:
            raise InputError(f"headwise needs a 2D padding mask [batch, tokens], got shape {tuple(attention_mask.shape)}; "
                             "pass the tokenizer's attention_mask instead of a prepared 4D mask.")
        valid = attention_mask.to(device=device, dtype=torch.bool)
        key_pos = torch.where(valid, valid.long().cumsum(-1) - 1, -1)
    key_pos = key_pos.long()
    lengths = key_pos.max(dim=-1).values + 1
    if bool((lengths < 1).any()):
        row = int((lengths < 1).nonzero()[0, 0])
        raise InputError(f"sequence {row} of the batch has no tokens (its attention_mask is all zeros); "
                         "give every sequence at least one token.")
    return ForwardInfo(query_pos=key_pos[:, -q_length:], key_pos=key_pos, lengths=lengths)


class Runtime:
    """What a patched model needs at run time; one per patched model."""

    def __init__(self, plan: Plan, target_length: int | None, backend: str, prefill: str | None = None):
        self.plan = plan
        self.prefill = plan.prefill if prefill is None else prefill   # "sparse" | "dense": forwards of > 1 query
        self.layers = [LayerKinds(i, layer, plan.weights) for i, layer in enumerate(plan.layers)]
        self.rules = [layer.rule for layer in self.layers]
        self.target_length = target_length
        self.backend = backend
        self.current: ForwardInfo | None = None
        self.key_pos: dict[int, torch.Tensor] = {}
        # per layer, set by the cache layer in this forward: its own new keys/values and its kind states
        self.new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.states: dict[int, dict] = {}

    def begin_forward(self, info: ForwardInfo) -> None:
        self.current = info
        self.key_pos = {}
        self.new_kv = {}
        self.states = {}

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
