"""The functions registered with transformers' attention and mask interfaces as "headwise"."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kinds.call import AttentionCall
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
    if kwargs.get("sliding_window"):
        raise ValueError(f"layer {layer_idx} uses the model's own sliding-window attention, which headwise does not "
                         "combine with a plan; patch a model whose layers use full attention.")
    new_keys, new_values = runtime.new_kv.get(layer_idx, (None, None))
    call = AttentionCall(
        module=module, query_pos=info.query_pos, key_pos=key_pos, lengths=runtime.effective_lengths(info.lengths),
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5, backend=runtime.backend,
        dense_prefill=runtime.prefill == "dense" and query.shape[-2] > 1,
        new_keys=new_keys, new_values=new_values, states=runtime.states.get(layer_idx))
    return runtime.layers[layer_idx].attention(query, key, value, call), None
