"""Dense prompt attention of plan layers through vLLM's own CPU kernel.

A plan that prefills dense (the shipped d25 and d50) has every prompt token of a plan layer read every
earlier key. vLLM's CPU kernel (``cpu_attention_with_kv_cache``) does that faster than torch's CPU flash
attention (``benchmarks/vllm_prefill_attention.py``), but reads only vLLM's cache layout (keys stored
per ISA), which the plugin's layers do not use (``paged.py``). So, per layer and step, the prefill
sequences' keys and values are copied into a scratch cache in vLLM's layout (one
``cpu_attn_reshape_and_cache`` call) and vLLM's kernel runs over it; vLLM's scheduler metadata for the
scratch cache is built once per step and head count (``PrefillBatch``).
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from . import paged

#: Tokens per block of the scratch cache (vLLM's CPU kernels want a multiple of 32).
SCRATCH_BLOCK = 128


class PrefillBatch:
    """The step's prefill sequences laid out for vLLM's kernel: which are run, their scratch slots and
    block table, and vLLM's scheduler metadata per ``(query heads, KV heads, head dim, dtype)``.

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
        lengths = [p.length for p in self.run]
        blocks = [-(-n // SCRATCH_BLOCK) for n in lengths]
        self.num_blocks = sum(blocks)
        starts = [0]
        for b in blocks:
            starts.append(starts[-1] + b)
        width = max(blocks, default=0)
        self.block_table = torch.tensor([[s + j if j < b else 0 for j in range(width)] for s, b in zip(starts, blocks)],
                                        dtype=torch.int32).reshape(len(blocks), width)
        self.slots = torch.cat([torch.arange(n) + s * SCRATCH_BLOCK for n, s in zip(lengths, starts)]) \
            if self.run else torch.zeros(0, dtype=torch.long)
        q_lens = [p.end - p.start for p in self.run]
        self.query_start_loc = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32)
        self.query_index = torch.cat([torch.arange(p.start, p.end) for p in self.run]) if self.run else None
        self._meta: dict = {}

    def metadata(self, H: int, Hkv: int, D: int, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
        """vLLM's scheduler metadata for these sequences and the ISA of the scratch cache."""
        key = (H, Hkv, D, dtype)
        if key not in self._meta:
            isa = _get_attn_isa(dtype, SCRATCH_BLOCK, D)
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(self.run), num_heads=H, num_kv_heads=Hkv, head_dim=D, seq_lens=self.seq_lens,
                dtype=dtype, query_start_loc=self.query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
            self._meta[key] = (meta, isa)
        return self._meta[key]


def dense_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                  output: torch.Tensor, step: paged.StepLayout, scale: float) -> list[paged.Prefill]:
    """Every prefill sequence of the step read densely (all earlier keys and its own, causally) by vLLM's
    CPU kernel, written into ``output``; returns the sequences left to the caller (context blocks given
    back to the pool). Shapes as ``paged.attend``."""
    batch = step.cache("vllm_prefill", lambda: PrefillBatch(step))
    if not batch.run:
        return batch.rest
    H, Hkv, D = query.shape[1], key.shape[1], query.shape[2]
    dtype = query.dtype
    keys, values = [], []
    for p in batch.run:
        k_new, v_new = key[p.start:p.end], value[p.start:p.end]
        if p.context:
            k_old, v_old = paged.context_kv(kv_cache, step.block_table[p.row], p.context)   # [Hkv, C, D]
            k_new = torch.cat([k_old.transpose(0, 1), k_new.to(k_old.dtype)])
            v_new = torch.cat([v_old.transpose(0, 1), v_new.to(v_old.dtype)])
        keys.append(k_new)
        values.append(v_new)
    keys = torch.cat(keys).to(dtype) if len(keys) > 1 else keys[0].to(dtype)
    values = torch.cat(values).to(dtype) if len(values) > 1 else values[0].to(dtype)
    meta, isa = batch.metadata(H, Hkv, D, dtype)
    scratch = torch.zeros(batch.num_blocks, Hkv, 2 * SCRATCH_BLOCK, D, dtype=dtype)     # zeros: no NaN past a length
    key_cache, value_cache = scratch.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, batch.slots, isa)
    q = query.index_select(0, batch.query_index) if len(batch.run) > 1 else query[batch.run[0].start:batch.run[0].end]
    out = torch.empty(q.shape, dtype=dtype)
    ops.cpu_attention_with_kv_cache(query=q.contiguous(), key_cache=key_cache, value_cache=value_cache, output=out,
                                    query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, scale=scale,
                                    causal=True, alibi_slopes=None, sliding_window=-1, block_table=batch.block_table,
                                    softcap=0.0, scheduler_metadata=meta, s_aux=None)
    output.index_copy_(0, batch.query_index, out.to(output.dtype))
    return batch.rest
