"""Reference sink + window attention: readable pure torch, fp32 math, explicit positions.

This is the contract every backend of the ``sink_window`` op implements (docs/design.md, "Kernels").
"""

from __future__ import annotations

import torch


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Which keys each query may read.

    Args:
        q_pos: ``[B, Q]`` int64 real position of each query, ``-1`` for a padding query.
        k_pos: ``[B, Hk, S]`` int64 real position of each key slot, ``-1`` for an empty slot
            (``Hk`` is ``Hkv`` or 1 when all KV heads share positions).
        sink: ``[Hkv]`` int64 number of leading tokens every query of that head reads.
        span: ``[B, Hkv]`` int64 local window length (the query itself included).

    Returns:
        ``[B, Hkv, Q, S]`` bool: ``k >= 0, q >= 0, k <= q`` and (``k < sink`` or ``k > q - span``).
    """
    q = q_pos[:, None, :, None]                        # [B, 1, Q, 1]
    k = k_pos[:, :, None, :]                           # [B, Hk, 1, S]
    in_sink = k < sink[None, :, None, None]            # [B, Hkv, 1, S]
    in_window = k > q - span[:, :, None, None]         # [B, Hkv, Q, S]
    return (k >= 0) & (q >= 0) & (k <= q) & (in_sink | in_window)


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    scale: float,
    query_chunk: int = 256,
) -> torch.Tensor:
    """Causal attention where every KV head reads its sink and its own local window.

    Args:
        q: ``[B, H, Q, D]`` queries (``H`` a multiple of ``Hkv``; query head ``i`` reads KV head
            ``i // (H // Hkv)``).
        k, v: ``[B, Hkv, S, D]`` keys and values, in any slot order.
        q_pos, k_pos, sink, span: see ``visible``.
        scale: softmax scale, usually ``D ** -0.5``.
        query_chunk: queries per step, bounding memory to ``B * H * query_chunk * S`` floats.

    Returns:
        ``[B, H, Q, D]`` in ``q.dtype``; a query with no visible key (padding) gets zeros.
    """
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    kf = k.float()                                      # [B, Hkv, S, D]
    vf = v.float()
    out = q.new_zeros(B, H, Q, D)
    for start in range(0, Q, query_chunk):
        stop = min(Q, start + query_chunk)
        qc = q[:, :, start:stop].float().view(B, Hkv, G, stop - start, D)
        allowed = visible(q_pos[:, start:stop], k_pos, sink, span)          # [B, Hkv, Qc, S]
        scores = torch.einsum("bhgqd,bhsd->bhgqs", qc, kf) * scale          # [B, Hkv, G, Qc, S]
        scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)               # empty rows -> 0
        oc = torch.einsum("bhgqs,bhsd->bhgqd", probs, vf)
        out[:, :, start:stop] = oc.reshape(B, H, stop - start, D).to(q.dtype)
    return out
