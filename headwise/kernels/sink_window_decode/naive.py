"""Reference decode step of sink + window attention: the ``sink_window`` reference with one query.

One query per sequence over the kept KV of each head, slots in any (ring) order, sequences of
different lengths in one batch (shorter ones have more empty slots, ``k_pos = -1``).
"""

from __future__ import annotations

import torch

from ..sink_window import naive as sink_window_naive


def sink_window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step.

    Args:
        q: ``[B, H, D]`` the new token's queries (``H`` a multiple of ``Hkv``).
        k, v: ``[B, Hkv, C, D]`` the cache (the new key already written), slots in any order.
        q_pos: ``[B]`` int64 position of the new token, -1 for an idle batch row.
        k_pos: ``[B, Hk, C]`` int64 slot positions (``Hk`` 1 or ``Hkv``), -1 for empty slots.
        sink: ``[Hkv]`` int64; span: ``[B, Hkv]`` int64 (see ``sink_window.naive.visible``).
        scale: softmax scale.

    Returns:
        ``[B, H, D]`` in ``q.dtype``; rows that see no key get zeros.
    """
    out = sink_window_naive.sink_window_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink, span, scale)
    return out[:, :, 0]
