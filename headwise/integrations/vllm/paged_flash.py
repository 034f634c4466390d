"""Adapter from vLLM's CUDA paged KV cache (the Triton / FlashAttention layout) to headwise's kernels.

No vLLM import: plain tensors, so it is tested on CPU (Triton kernels under ``TRITON_INTERPRET=1``).

vLLM 0.32 hands a CUDA attention backend one tensor per layer, ``kv_cache [P, Hkv, bs, 2*D]`` in
logical order; its physical strides follow vLLM's KV layout (blocks need not be outermost). vLLM's
Triton backend reads keys as ``kv_cache.transpose(1, 2)[..., :D]`` and values as ``[..., D:]``
(``[P, bs, Hkv, D]`` each, written by vLLM's own ``reshape_and_cache_flash``). That is
``paged_decode``'s pool layout (``[P, block_size, Hb, D]``, any strides, last stride 1), so the
adapter reads vLLM's cache in place and never writes it: vLLM's cache write runs unchanged.

* Decode: one ``paged_decode`` call per KV head ``h``, over the view ``[P, bs, 1, D]`` of that
  head (``Hb = 1``, pool block = vLLM block) with a table per sequence listing only the blocks of
  the head's sink and window (``paged.decode_tables``; dense heads: all blocks), and ``pos_pool
  [P, bs]`` built once per step from the block tables (``paged.StepLayout`` with one head per pool
  block). A per-head view works for every stride order; grouping heads into one call would need
  the block stride to be a multiple of the head stride, which vLLM's layouts do not promise.
* Prefill: each sequence with more than one new token through ``sink_window_attention``, over its
  new keys for a fresh prompt, else over its blocks gathered in order (chunked prefill).

Span rule: as ``paged`` (``N`` = the sequence's length at the end of this step).
"""

from __future__ import annotations

import torch

from ...kernels.paged_decode import paged_decode
from ...kernels.sink_window import sink_window_attention
from ...kinds.kv_rule import LayerRule
from .paged import StepLayout, decode_tables, query_heads


def split_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views of one layer's cache, as vLLM's Triton backend reads it (no copy).

    Args:
        kv_cache: ``[P, Hkv, bs, 2*D]`` (logical order, any strides).

    Returns:
        ``(key_cache, value_cache)``, each ``[P, bs, Hkv, D]``.
    """
    D = kv_cache.shape[-1] // 2
    key_cache, value_cache = kv_cache.transpose(1, 2).split(D, dim=-1)
    return key_cache, value_cache


def step_layout(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                block_size: int) -> StepLayout:
    """The per-step layout for this cache: pool blocks are vLLM blocks (one ``pos_pool`` row each)."""
    return StepLayout.build(query_start_loc, seq_lens, block_table, block_size, num_kv_heads=1)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
           output: torch.Tensor, step: StepLayout, rule: LayerRule, scale: float, backend: str = "auto",
           prefill_rule: LayerRule | None = None) -> None:
    """A plan layer's attention for one vLLM step, written into ``output``.

    Args:
        query: ``[T, H, D]``; key, value: ``[T, Hkv, D]`` this step's new tokens (already in
            ``kv_cache``, written by vLLM).
        kv_cache: ``[P, Hkv, bs, 2*D]`` the layer's cache in vLLM's CUDA layout.
        output: ``[T, H, D]`` written for every real token.
        step: from ``step_layout``; rule: the layer's sink/span rule; scale: softmax scale.
        prefill_rule: the rule of prefill tokens (``rule.as_dense()`` for a plan that prefills dense:
            the cache holds every key, so they read everything); default ``rule``.
        backend: kernel backend for ``paged_decode`` / ``sink_window_attention`` (``auto``: Triton
            on CUDA).
    """
    device = query.device
    H, Hkv = query.shape[1], key.shape[1]
    G = H // Hkv
    rule = rule.to(device)
    key_cache, value_cache = split_cache(kv_cache)
    bs = key_cache.shape[1]
    if step.decode_rows.numel():
        rows, tokens = step.decode_rows, step.decode_tokens
        lengths = step.seq_lens[rows]
        spans = rule.span(lengths)                                                          # [Bd, Hkv]
        pos_pool = step.pos_pool(key_cache.shape[0])                                        # [P, bs]
        table = step.block_table[rows]
        q_all = query[tokens]                                                               # [Bd, H, D]
        for h in range(Hkv):
            tables = decode_tables(table, lengths, int(rule.sink[h]), spans[:, h], [0], bs, 1)    # [Bd, 1, K]
            qh = query_heads([h], G, device)
            out = paged_decode(q_all[:, qh], key_cache[:, :, h:h + 1], value_cache[:, :, h:h + 1], pos_pool, tables,
                               lengths - 1, rule.sink[h:h + 1], spans[:, h:h + 1], scale, backend=backend)
            output[tokens[:, None], qh[None, :]] = out.to(output.dtype)
    prefill_rule = rule if prefill_rule is None else prefill_rule.to(device)
    for p in step.prefills:
        q = query[p.start:p.end].transpose(0, 1)[None]                                      # [1, H, Q, D]
        q_pos = torch.arange(p.context, p.length, device=device)[None]                       # [1, Q]
        if p.context == 0:
            k = key[p.start:p.end].transpose(0, 1)[None]                                    # [1, Hkv, Q, D]
            v = value[p.start:p.end].transpose(0, 1)[None]
        else:
            blocks = step.block_table[p.row, :-(-p.length // bs)].long()
            k = key_cache[blocks].reshape(-1, Hkv, key_cache.shape[-1])[:p.length].transpose(0, 1)[None]
            v = value_cache[blocks].reshape(-1, Hkv, value_cache.shape[-1])[:p.length].transpose(0, 1)[None]
        k_pos = torch.arange(k.shape[2], device=device)[None, None]                          # [1, 1, N]
        span = prefill_rule.span(torch.tensor([p.length], device=device))                    # [1, Hkv]
        out = sink_window_attention(q, k, v, q_pos, k_pos, prefill_rule.sink, span, scale, backend=backend)
        output[p.start:p.end] = out[0].transpose(0, 1).to(output.dtype)
