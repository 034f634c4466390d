"""The functions registered with transformers' attention and mask interfaces as "headwise"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..kernels.sink_window import sink_window_attention
from .runtime import ForwardInfo, forward_info, runtime_for

NAME = "headwise"


@dataclass
class HeadwiseMask:
    """What the model passes to every layer as ``attention_mask``: the forward's real positions.

    Replaces HF's ``[B, 1, q, kv]`` mask: headwise builds each head's pattern from positions inside
    the kernel instead of materialising it.
    """

    info: ForwardInfo


def headwise_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  attention_mask: torch.Tensor | None = None, config=None, device="cpu", **kwargs) -> HeadwiseMask:
    """Mask-interface function: records the forward's positions on the model's runtime."""
    info = forward_info(attention_mask, batch_size, q_length, int(q_offset), torch.device(device))
    runtime_for(config).begin_forward(info)
    return HeadwiseMask(info)


def headwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Attention-interface function.

    Args:
        module: the attention module (``layer_idx``, ``config``).
        query: ``[B, H, q, D]``; key, value: ``[B, Hkv, kv, D]`` (cache already applied).
        attention_mask: the ``HeadwiseMask`` made by ``headwise_mask``.

    Returns:
        ``(out [B, q, H, D], None)``.
    """
    if not isinstance(attention_mask, HeadwiseMask):
        raise TypeError(f"headwise attention got a {type(attention_mask).__name__} mask instead of its own; "
                        "pass a 2D padding mask (or none) to the patched model, not a prepared 4D mask.")
    if dropout:
        raise ValueError("headwise attention does not implement attention dropout; call model.eval() first.")
    runtime = runtime_for(module.config)
    info = attention_mask.info
    layer_idx = module.layer_idx
    key_pos = runtime.key_pos.get(layer_idx)
    if key_pos is None or key_pos.shape[-1] != key.shape[-2]:
        key_pos = info.key_pos[:, None, -key.shape[-2]:]                      # [B, 1, kv]
    rule = runtime.rules[layer_idx].to(query.device)
    span = rule.span(runtime.effective_lengths(info.lengths))               # [B, Hkv]
    if kwargs.get("sliding_window"):
        raise ValueError(f"layer {layer_idx} uses the model's own sliding-window attention, which headwise does not "
                         "combine with a plan; patch a model whose layers use full attention.")
    sink = rule.sink
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if rule.all_dense or (runtime.prefill == "dense" and query.shape[-2] > 1):
        # dense prefill: every head reads all it has; the cache still keeps only the plan's KV
        return dense_attention(module, query, key, value, info.query_pos, key_pos, scale), None
    out = sink_window_attention(query, key, value, info.query_pos, key_pos, sink, span, scale,
                                backend=runtime.backend)
    return out.transpose(1, 2).contiguous(), None


def dense_attention(module, query, key, value, q_pos, k_pos, scale) -> torch.Tensor:
    """A layer whose heads are all dense runs transformers' own sdpa path, bit for bit.

    Positions become HF's boolean mask only when slots are not simply ``0..S-1`` (padding, or
    a cache that dropped padding slots). Returns ``[B, q, H, D]``; padding queries get zeros.
    """
    S, Q = key.shape[-2], query.shape[-2]
    slots = torch.arange(S, device=key.device)
    if bool((k_pos == slots).all()) and bool((q_pos == slots[S - Q:]).all()):
        mask = None
    else:
        mask = (k_pos[:, :, None, :] <= q_pos[:, None, :, None]) & (k_pos[:, :, None, :] >= 0)   # [B, Hk, Q, S]
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
    out, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scale)
    return out.masked_fill((q_pos < 0)[:, :, None, None], 0.0)
