"""Dense prompt attention of plan layers through vLLM's own CPU kernel.

A plan that prefills dense (the shipped d25 and d50) has every prompt token of a plan layer read every
earlier key. vLLM's CPU kernel (``cpu_attention_with_kv_cache``) does that faster than torch's CPU flash
attention (``benchmarks/vllm_prefill_attention.py``), but reads only vLLM's cache layout (keys stored
per ISA), which the plugin's layers do not use (``paged.py``). So, per layer and step, the prefill
sequences' keys and values are copied into a scratch cache in vLLM's layout (one
``cpu_attn_reshape_and_cache`` call) and vLLM's kernel runs over it; vLLM's scheduler metadata for the
scratch cache is built once per step and head count (``PrefillBatch``). The kernel call itself is
``kernels.causal_prefill.CausalBatch``, which the engine's dense prefill runs too.
"""

from __future__ import annotations

import torch

from ...kernels.causal_prefill import CausalBatch
from . import paged


class PrefillBatch:
    """The step's prefill sequences laid out for vLLM's kernel: which are run (``kernel``: their scratch
    layout and vLLM's metadata, ``kernels.causal_prefill``) and where their queries sit in the step.

    Built once per step and KV cache group (``paged.StepLayout.cache``); sequences with a
    ``NULL_BLOCK`` among their context blocks are left to ``paged.attend``'s general path (``rest``).
    """

    def __init__(self, step: paged.StepLayout) -> None:
        bs = step.block_size
        table = step.block_table
        self.run, self.rest = [], []
        for p in step.prefills:
            held = p.context == 0 or not bool((table[p.row, :-(-p.context // bs)] == paged.NULL_BLOCK).any())
            (self.run if held else self.rest).append(p)
        self.kernel = CausalBatch([p.length for p in self.run], [p.end - p.start for p in self.run])
        self.query_index = torch.cat([torch.arange(p.start, p.end) for p in self.run]) if self.run else None


def dense_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  output: torch.Tensor, step: paged.StepLayout, scale: float) -> list[paged.Prefill]:
    """Every prefill sequence of the step read densely (all earlier keys and its own, causally) by vLLM's
    CPU kernel, written into ``output``; returns the sequences left to the caller (context blocks given
    back to the pool). Shapes as ``paged.attend``."""
    batch = step.cache("vllm_prefill", lambda: PrefillBatch(step))
    if not batch.run:
        return batch.rest
    keys, values = [], []
    for p in batch.run:
        k_new, v_new = key[p.start:p.end], value[p.start:p.end]
        if p.context:
            k_old, v_old = paged.context_kv(kv_cache, step.block_table[p.row], p.context)   # [Hkv, C, D]
            k_new = torch.cat([k_old.transpose(0, 1), k_new.to(k_old.dtype)])
            v_new = torch.cat([v_old.transpose(0, 1), v_new.to(v_old.dtype)])
        keys.append(k_new)
        values.append(v_new)
    keys = torch.cat(keys) if len(keys) > 1 else keys[0]
    values = torch.cat(values) if len(values) > 1 else values[0]
    q = query.index_select(0, batch.query_index) if len(batch.run) > 1 else query[batch.run[0].start:batch.run[0].end]
    out = batch.kernel.run(q, keys, values, scale)
    output.index_copy_(0, batch.query_index, out.to(output.dtype))
    return batch.rest
