"""Record every layer's post-RoPE queries, keys and values while the unpatched model runs."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAPTURE_NAME = "headwise_capture"


def capture_qkv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model`` (dense sdpa) on ``input_ids`` ``[1, T]`` and return, per layer, fp32 CPU tensors
    ``(q [H, T, D], k [Hkv, T, D], v [Hkv, T, D])`` as its attention saw them (after RoPE).

    The model's attention implementation is restored afterwards.
    """
    if input_ids.shape[0] != 1:
        raise ValueError(f"capture_qkv takes one sequence [1, T], got batch {input_ids.shape[0]}.")
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = tuple(t[0].detach().float().cpu() for t in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(previous or "sdpa")
    return [captured[i] for i in sorted(captured)]
