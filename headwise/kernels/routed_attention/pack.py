"""Run only the active (query head, token) pairs through a ``sink_window`` kernel.

Two layouts, both built with torch indexing (no Python loop over tokens):

* **Decode-sized calls** (at most ``GROUP_ROWS_MAX_QUERIES`` queries): one row per (sequence, KV head)
  with at least one active pair, holding all ``G`` query heads of the group. A KV head none of whose
  query heads is active for a sequence is left out, so its keys and values are not read. Inside a
  row every query head is computed (reading the group's KV once) and inactive outputs are zeroed.
* **Prefill-sized calls**: per KV head, one row per (sequence, query head) with its active tokens
  packed in order (padded with position -1 to the longest row). The kernel's work follows the
  packed queries, so a routed-out pair does no attention work.

Each KV head is its own call (heads may have different sinks).
"""

from __future__ import annotations

from typing import Callable

import torch

#: Calls with at most this many queries use the per-(sequence, KV head) row layout (decode).
GROUP_ROWS_MAX_QUERIES = 16


def packed_routed_attention(inner: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                            active: torch.Tensor) -> torch.Tensor:
    """``routed_attention`` (shapes in ``naive.routed_attention``) with ``inner`` a ``sink_window_attention``."""
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    active = active & (q_pos >= 0)[:, None, :]
    out = q.new_zeros(B, H, Q, D)
    for h in range(Hkv):
        heads = slice(h * G, (h + 1) * G)
        pos_row = h if k_pos.shape[1] > 1 else 0
        act = active[:, heads]                                                         # [B, G, Q]
        if Q <= GROUP_ROWS_MAX_QUERIES:
            rows = act.flatten(1).any(1).nonzero().squeeze(1)                          # sequences reading head h
            if rows.numel() == 0:
                continue
            o = inner(q[rows, heads], k[rows, h:h + 1], v[rows, h:h + 1], q_pos[rows],
                      k_pos[rows, pos_row:pos_row + 1], sink[h:h + 1], span[rows, h:h + 1], scale)
            out[rows, heads] = o.masked_fill(~act[rows][..., None], 0.0)
            continue
        counts = act.sum(-1)                                                           # [B, G]
        entries = (counts > 0).nonzero()                                               # [E, 2]: (b, g)
        if entries.shape[0] == 0:
            continue
        b, g = entries[:, 0], entries[:, 1]
        width = int(counts.max())
        # active token indices of every entry first, in token order (stable sort on "inactive")
        order = torch.sort((~act[b, g]).to(torch.int8), dim=-1, stable=True).indices[:, :width]    # [E, width]
        used = torch.arange(width, device=q.device)[None, :] < counts[b, g][:, None]               # [E, width]
        qh = q[b, h * G + g]                                                           # [E, Q, D]
        packed_q = qh.gather(1, order[..., None].expand(-1, -1, D))[:, None]           # [E, 1, width, D]
        packed_pos = torch.where(used, q_pos[b].gather(1, order), -1)                  # [E, width]
        o = inner(packed_q, k[b, h:h + 1], v[b, h:h + 1], packed_pos, k_pos[b, pos_row:pos_row + 1],
                  sink[h:h + 1], span[b, h:h + 1], scale)[:, 0]                        # [E, width, D]
        e_idx, slot = used.nonzero(as_tuple=True)
        out[b[e_idx], h * G + g[e_idx], order[e_idx, slot]] = o[e_idx, slot]
    return out
