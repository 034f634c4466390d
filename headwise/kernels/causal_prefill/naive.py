"""Reference causal prompt attention over a batch of sequences: plain torch, fp32, no tiling."""

from __future__ import annotations

import torch


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: list[int],
                     q_lens: list[int], scale: float) -> torch.Tensor:
    """Every sequence's queries read its keys up to their own positions (the contract of ``CausalBatch.run``).

    Args:
        q: ``[T, H, D]`` the sequences' queries one after the other (``T = sum(q_lens)``); sequence ``b``'s
            queries are the last ``q_lens[b]`` of its ``lengths[b]`` positions.
        keys, values: ``[S, Hkv, D]`` the sequences' keys in position order (``S = sum(lengths)``); query head
            ``i`` reads KV head ``i // (H // Hkv)``.
        lengths, q_lens: keys and queries per sequence.
        scale: softmax scale.

    Returns:
        ``[T, H, D]`` in ``q.dtype`` (math in fp32).
    """
    H, Hkv = q.shape[1], keys.shape[1]
    outs, q_at, k_at = [], 0, 0
    for n, m in zip(lengths, q_lens):
        qs = q[q_at:q_at + m].float().transpose(0, 1)                                  # [H, m, D]
        ks = keys[k_at:k_at + n].float().transpose(0, 1).repeat_interleave(H // Hkv, 0)  # [H, n, D]
        vs = values[k_at:k_at + n].float().transpose(0, 1).repeat_interleave(H // Hkv, 0)
        scores = qs @ ks.transpose(1, 2) * scale                                       # [H, m, n]
        query_pos = torch.arange(n - m, n)[:, None]
        scores = scores.masked_fill(torch.arange(n)[None, :] > query_pos, float("-inf"))
        outs.append((torch.softmax(scores, -1) @ vs).transpose(0, 1))                 # [m, H, D]
        q_at, k_at = q_at + m, k_at + n
    return torch.cat(outs).to(q.dtype) if outs else q.new_zeros(q.shape)
