"""A cache layer that keeps, per KV head, only what the plan lets that head read again.

HF cache tensors are rectangular per layer, so a layer stores ``[B, Hkv, C, D]`` with ``C`` the
largest kept length of its heads, plus ``pos [B, Hkv, C]``: the real position of every slot, -1
for an empty one. Slots are in no particular order (attention reads positions, not slot order):
after a prefill the kept keys are compacted; each decode step then writes its key into a free
slot or over a key that just left the head's window (a ring), so a window head stays at
``sink + span`` slots while a dense head grows.

Kinds with a state other than KV (a ``lightning`` head's recurrent state) keep it in ``states``:
one dict of batch-first tensors per kind group (``KindGroup.state_key``), created and updated by
the group during attention; this layer only hands it over, reorders it with the batch and counts
its bytes. Such heads keep one KV slot here (the current token), per their ``kv_rule``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .runtime import LayerRule, Runtime


class HeadwiseLayer(DynamicLayer):
    """One layer's KV under a plan; see the module docstring for the layout."""

    def __init__(self, layer_idx: int, rule: LayerRule, runtime: Runtime):
        super().__init__()
        self.layer_idx = layer_idx
        self.rule = rule
        self.runtime = runtime
        self.pos: torch.Tensor | None = None
        self.seen = 0  # tokens fed so far, padding included (HF's notion of cache length)
        self.states: dict[str, dict[str, torch.Tensor]] = {}   # recurrent kind states, batch-first tensors
        self.has_state_kinds = any(g.state_key is not None for g in runtime.layers[layer_idx].groups)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self.keys = key_states.new_empty(B, H, 0, D)
        self.values = value_states.new_empty(B, H, 0, D)
        self.pos = torch.empty(B, H, 0, dtype=torch.long, device=key_states.device)

    # -- what stays -----------------------------------------------------------------------------
    def _window_start(self, rule: LayerRule, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv]`` first window position the next query (at position ``lengths``) reads."""
        nxt = lengths + 1
        return nxt[:, None] - rule.span(self.runtime.effective_lengths(nxt))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Add ``[B, Hkv, q, D]`` new keys/values; returns every key this forward's queries may read."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        info = self.runtime.forward()
        rule = self.rule.to(key_states.device)
        B, H, q, _ = key_states.shape
        self.seen += q
        if self.has_state_kinds:
            self.runtime.new_kv[self.layer_idx] = (key_states, value_states)
            self.runtime.states[self.layer_idx] = self.states
        new_pos = info.query_pos[:, None, :].expand(B, H, q)
        if q == 1 and self.pos.shape[-1] > 0:
            return self._write_one(key_states, value_states, new_pos, rule, info.lengths)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        pos = torch.cat([self.pos, new_pos], dim=-1)
        self.runtime.key_pos[self.layer_idx] = pos
        keep = (pos >= 0) & ((pos < rule.sink[None, :, None]) |
                             (pos >= self._window_start(rule, info.lengths)[:, :, None]))
        capacity = int(keep.sum(-1).max())
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :capacity]   # kept first
        self.keys = keys.gather(2, order[..., None].expand(-1, -1, -1, keys.shape[-1]))
        self.values = values.gather(2, order[..., None].expand(-1, -1, -1, values.shape[-1]))
        self.pos = torch.where(keep.gather(2, order), pos.gather(2, order), -1)
        self._grow(1)   # the next token's slot: a window head then cycles through sink + span slots
        return keys, values

    def _write_one(self, key_states, value_states, new_pos, rule: LayerRule, lengths: torch.Tensor):
        """Decode step: put the new key in a free slot or over one that left the window."""
        start = lengths[:, None] - rule.span(self.runtime.effective_lengths(lengths))       # [B, Hkv]
        reusable = (self.pos < 0) | ((self.pos >= rule.sink[None, :, None]) & (self.pos < start[:, :, None]))
        if not bool(reusable.any(-1).all()):
            old = self.pos.shape[-1]
            self._grow(max(64, old // 4))
            reusable = torch.cat([reusable, reusable.new_ones(*reusable.shape[:2], self.pos.shape[-1] - old)], -1)
        slot = reusable.to(torch.int8).argmax(-1, keepdim=True)                            # [B, Hkv, 1]
        D = self.keys.shape[-1]
        self.keys.scatter_(2, slot[..., None].expand(-1, -1, -1, D), key_states)
        self.values.scatter_(2, slot[..., None].expand(-1, -1, -1, D), value_states)
        self.pos.scatter_(2, slot, new_pos)
        self.runtime.key_pos[self.layer_idx] = self.pos
        return self.keys, self.values

    def _grow(self, extra: int) -> None:
        self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, extra))
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, extra))
        self.pos = torch.nn.functional.pad(self.pos, (0, extra), value=-1)

    # -- HF cache-layer protocol ------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.pos, self.seen = None, 0
        self.states = {}

    def _map_states(self, fn) -> None:
        self.states = {key: {name: fn(t) for name, t in state.items()} for key, state in self.states.items()}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a headwise cache has dropped tokens outside each head's window and cannot be "
                                  "cropped; run assisted or speculative decoding on an unpatched model.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys, self.values, self.pos = (t.repeat_interleave(repeats, dim=0)
                                                for t in (self.keys, self.values, self.pos))
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values, self.pos = (t[indices.to(t.device)] for t in (self.keys, self.values, self.pos))
        self._map_states(lambda t: t[indices.to(t.device)])

    # -- accounting -------------------------------------------------------------------------------
    def kept_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        per_slot = self.keys.shape[-1] * (self.keys.element_size() + self.values.element_size())
        return int((self.pos >= 0).sum()) * per_slot

    def state_bytes(self) -> int:
        """Bytes of the recurrent kind states (constant in sequence length)."""
        return sum(t.numel() * t.element_size() for state in self.states.values() for t in state.values())


def install_layers(cache: Cache, runtime: Runtime) -> None:
    """Give a fresh (empty) HF cache one ``HeadwiseLayer`` per model layer."""
    cache.layers = [HeadwiseLayer(i, rule, runtime) for i, rule in enumerate(runtime.rules)]
    cache.layer_class_to_replicate = None


def kv_bytes(cache: Cache) -> dict[str, int]:
    """Bytes of a cache: ``kept`` (KV entries really held), ``allocated`` (tensor storage), ``state``
    (recurrent kind states such as lightning heads', constant in length; not in the other two).

    Works for headwise and plain HF caches (where ``kept == allocated`` and ``state == 0``).
    """
    if not isinstance(cache, Cache):
        from ..errors import InputError

        raise InputError(f"kv_bytes needs a transformers Cache (e.g. generate(..., return_dict_in_generate=True)"
                         f".past_key_values), got {type(cache).__name__}.")
    kept = allocated = state = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        size = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        allocated += size
        kept += layer.kept_bytes() if isinstance(layer, HeadwiseLayer) else size
        state += layer.state_bytes() if isinstance(layer, HeadwiseLayer) else 0
    return {"kept": kept, "allocated": allocated, "state": state}
