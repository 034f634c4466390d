"""A patched model continuing from a dense prefill computed once and shared by many plans.

Benchmarks and the calibrator's validation score compare several plans on one prompt. With
``prefill="dense"`` every plan sees the same prompt KV, so the unpatched model prefills once
(``kv_of``), each plan gets the part of it that it keeps (``plan_cache``, the runtime's own
compaction), and the continuation runs through the patched model, each token reading what a decode
step of the plan would read (``decode_rule``; ``continuation_nll`` scores teacher-forced tokens).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def kv_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``[1, Hkv, T, D]`` of a plain (dense) HF cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def plan_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """A headwise cache holding, per head, what the patched ``model``'s plan keeps of the dense
    ``kv`` (positions ``0..T-1``): the runtime's own compaction after a dense prefill."""
    from transformers.cache_utils import DynamicCache

    from .cache import install_layers
    from .runtime import forward_info

    runtime = model._headwise["runtime"]
    cache = DynamicCache()
    install_layers(cache, runtime)
    length = kv[0][0].shape[-2]
    runtime.begin_forward(forward_info(None, 1, length, 0, kv[0][0].device))
    for i, (layer, (keys, values)) in enumerate(zip(cache.layers, kv)):
        passed_keys, passed_values = layer.update(keys, values)
        fold_states(runtime, i, passed_keys, passed_values)
    return cache


def fold_states(runtime, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Fold a dense prefill's ``keys``/``values`` ``[1, Hkv, T, D]`` (the whole prompt) into the
    recurrent states of layer ``layer_idx``'s state-holding groups (``lightning``, ``hybrid``), as
    their ``attention`` does in a ``prefill="dense"`` forward (``fold``: the state without outputs)."""
    from ..kinds.call import AttentionCall

    kinds = runtime.layers[layer_idx]
    groups = [g for g in kinds.groups if g.state_key is not None]
    if not groups:
        return
    info = runtime.forward()
    call = AttentionCall(module=None, query_pos=info.query_pos, key_pos=runtime.key_pos[layer_idx],
                         lengths=runtime.effective_lengths(info.lengths), scale=keys.shape[-1] ** -0.5,
                         backend=runtime.backend, dense_prefill=True,
                         new_keys=keys, new_values=values, states=runtime.states[layer_idx])
    for group in groups:
        index = torch.tensor(group.heads)
        group.fold(keys.index_select(1, index), values.index_select(1, index),
                   call.for_heads(list(group.heads), kinds.num_kv_heads))


@contextmanager
def decode_rule(model):
    """Inside, a multi-token forward of the patched ``model`` reads per query only what the plan lets a
    decode step read (its sink + window), not everything kept as a dense-prefill forward does."""
    runtime = model._headwise["runtime"]
    before, runtime.prefill = runtime.prefill, "sparse"
    try:
        yield
    finally:
        runtime.prefill = before


@torch.no_grad()
def continuation_nll(model, kv: list[tuple[torch.Tensor, torch.Tensor]], last_logits: torch.Tensor,
                     tokens: torch.Tensor, total_length: int, chunk: int = 1024) -> tuple[float, int]:
    """``(summed NLL, count)`` of ``tokens`` ``[1, C]`` continuing a dense prefill, through the patched
    ``model`` (``patch_model(..., prefill="dense")`` already applied).

    ``kv``: the unpatched prefill's per-layer ``[1, Hkv, T, D]`` keys and values (``kv_of``);
    ``last_logits`` ``[1, 1, V]``: its logits at the last prompt position (they predict ``tokens[0]``);
    ``total_length``: the sequence's final length, ``T + C`` (elastic spans are sized for it, as in a
    generation whose length is known). Every token reads what a decode step would, so the result does
    not depend on ``chunk`` (tokens per forward).
    """
    from . import expected_length

    cache, prev, total = plan_cache(model, kv), last_logits, 0.0
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start:start + chunk]
        with expected_length(model, total_length), decode_rule(model):
            logits = model(input_ids=piece, past_key_values=cache, use_cache=True).logits
        scored = torch.cat([prev, logits[:, :-1]], 1).float()
        total += float(torch.nn.functional.cross_entropy(scored[0], piece[0], reduction="sum"))
        prev = logits[:, -1:]
    return total, int(tokens.shape[1])
