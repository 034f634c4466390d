"""Reference routed attention: the ``sink_window`` reference on every pair, inactive pairs zeroed.

This is the contract every backend of the ``routed_attention`` op implements (docs/design.md, "Kernels"): the
output of an active (query head, token) pair is exactly the sink + window attention of that query;
an inactive pair, or a padding query, gives zeros.
"""

from __future__ import annotations

import torch

from ..sink_window import naive as sink_window_naive


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                     sink: torch.Tensor, span: torch.Tensor, scale: float, active: torch.Tensor) -> torch.Tensor:
    """Sink + window attention of the active (query head, token) pairs.

    Args:
        q: ``[B, H, Q, D]`` queries (query head ``i`` reads KV head ``i // (H // Hkv)``).
        k, v: ``[B, Hkv, S, D]`` keys and values, in any slot order.
        q_pos: ``[B, Q]`` int64 query positions, -1 for padding.
        k_pos: ``[B, Hk, S]`` int64 key positions (``Hk`` is 1 or ``Hkv``), -1 for empty slots.
        sink: ``[Hkv]`` int64; span: ``[B, Hkv]`` int64 (``sink_window.naive.visible``).
        scale: softmax scale.
        active: ``[B, H, Q]`` bool, the pairs to compute.

    Returns:
        ``[B, H, Q, D]`` in ``q.dtype``: attention output where ``active``, zeros elsewhere.
    """
    out = sink_window_naive.sink_window_attention(q, k, v, q_pos, k_pos, sink, span, scale)
    return out.masked_fill(~active[..., None], 0.0)
