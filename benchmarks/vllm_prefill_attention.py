"""Dense prompt attention of one sequence in the vLLM plugin: the old path, the new one, vLLM's CPU kernel.

``python benchmarks/vllm_prefill_attention.py [--threads 2] [--repeat 5]`` (under the heavy-job lock).
For a plan that prefills dense (the shipped d25 / d50), every prompt token of a plan layer reads every
earlier key. Per case (a fresh prompt, or a chunk after cached context) and dtype, median ms of one
layer's call for one sequence:

* ``old``: what ``paged.attend`` ran before: ``sink_window_attention`` with every head dense, over the
  chunk's keys (fresh prompt) or the sequence's blocks gathered with positions (``gather_pages``);
* ``flash``: ``paged.dense_prefill`` (torch's CPU flash attention, context and chunk merged by
  log-sum-exp), over the same cache;
* ``new``: ``cpu_prefill.dense_prefill`` (what the plugin runs now): the sequence's keys copied into a
  scratch cache in vLLM's layout, then vLLM's kernel (copy and scheduler metadata inside the timer);
* ``vllm``: vLLM's own CPU kernel (``cpu_attention_with_kv_cache``, its scheduler metadata built
  outside the timer) over its own cache layout, written by its own op.

Shapes: SmolLM2-135M's (9 query / 3 KV heads, head dim 64), block size 128. Prints a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import median_seconds  # noqa: E402
from headwise.integrations.vllm import paged  # noqa: E402
from headwise.kinds.dense import Dense  # noqa: E402
from headwise.patches.runtime import LayerRule  # noqa: E402

H, HKV, D, BS = 9, 3, 64, 128
CASES = [(0, 2048), (0, 1024), (2048, 1024), (3072, 1024)]      # (context, new tokens)


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``fn()``."""
    return median_seconds(fn, repeat) * 1e3


def old_attend(query, key, value, kv_cache, output, step, rule, scale):
    """``paged.attend``'s prefill as it was: ``sink_window_attention`` for every sequence."""
    from headwise.kernels.paged_decode.naive import gather_pages
    from headwise.kernels.sink_window import sink_window_attention

    k_pool, v_pool = paged.pools(kv_cache)
    for p in step.prefills:
        q = query[p.start:p.end].transpose(0, 1)[None]
        q_pos = torch.arange(p.context, p.length)[None]
        if p.context == 0:
            k, v, k_pos = key[p.start:p.end].transpose(0, 1)[None], value[p.start:p.end].transpose(0, 1)[None], q_pos[:, None]
        else:
            n_blocks = -(-p.length // step.block_size)
            phys = step.block_table[p.row, :n_blocks].long()
            tables = (phys[None, :] * HKV + torch.arange(HKV)[:, None])[None]
            k, v, k_pos = gather_pages(k_pool, v_pool, step.pos_pool(k_pool.shape[0]), tables)
            k, v, k_pos = k[:, :, :p.length], v[:, :, :p.length], k_pos[:, :1, :p.length]
        out = sink_window_attention(q, k, v, q_pos, k_pos, rule.sink, rule.span(torch.tensor([p.length])), scale)
        output[p.start:p.end] = out[0].transpose(0, 1).to(output.dtype)


def vllm_kernel(context: int, new: int, dtype, keys, values, query, scale):
    """A closure running vLLM's CPU kernel for this case (cache written, metadata built beforehand)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    L = context + new
    n = -(-L // BS)
    isa = _get_attn_isa(dtype, BS, D)
    cache = torch.zeros(n + 1, HKV, BS * 2, D, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.arange(1, n + 1, dtype=torch.int32)[None]
    slots = (table[0, torch.arange(L) // BS].long() * BS + torch.arange(L) % BS)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa)
    qsl = torch.tensor([0, new], dtype=torch.int32)
    seq_lens = torch.tensor([L], dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=1, num_heads=H, num_kv_heads=HKV, head_dim=D,
                                               seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl, causal=True,
                                               sliding_window_size=-1, isa=isa, enable_kv_split=False)
    out = torch.empty(new, H, D, dtype=dtype)

    def run():
        ops.cpu_attention_with_kv_cache(query=query, key_cache=key_cache, value_cache=value_cache, output=out,
                                        query_start_loc=qsl, seq_lens=seq_lens, scale=scale, causal=True,
                                        alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
                                        scheduler_metadata=meta, s_aux=None)
        return out
    return run, isa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scale = D ** -0.5
    rule = LayerRule.from_heads(tuple([Dense()] * HKV))
    print(f"torch {torch.__version__}, {args.threads} threads, H={H} Hkv={HKV} D={D} block {BS}, median of "
          f"{args.repeat}")
    from headwise.integrations.vllm import cpu_prefill

    print("| dtype | context | new tokens | old ms | flash ms | new ms | vLLM kernel ms (isa) | old / vLLM | "
          "flash / vLLM | new / vLLM | max abs diff new vs vLLM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for context, new in CASES:
            torch.manual_seed(0)
            L = context + new
            keys, values = torch.randn(L, HKV, D, dtype=dtype), torch.randn(L, HKV, D, dtype=dtype)
            query = torch.randn(new, H, D, dtype=dtype)
            n = -(-L // BS)
            table = (torch.randperm(n) + 1).to(torch.int32)[None]          # shuffled blocks, block 0 = null
            cache = torch.zeros(n + 1, HKV, BS, 2 * D, dtype=dtype)
            pos = torch.arange(L)
            paged.write(cache, keys, values, table[0, pos // BS].long() * BS + pos % BS)
            step = paged.StepLayout.build(torch.tensor([0, new]), torch.tensor([L]), table, BS, HKV,
                                          prefilling=torch.tensor([True]))
            out_old, out_flash, out_new = (torch.empty(new, H, D, dtype=dtype) for _ in range(3))
            k_new, v_new = keys[context:], values[context:]
            t_old = timed(lambda: old_attend(query, k_new, v_new, cache, out_old, step, rule, scale), args.repeat)
            t_flash = timed(lambda: paged.attend(query, k_new, v_new, cache, out_flash, step, rule, scale,
                                                 prefill_rule=rule), args.repeat)

            def plugin():
                step._cached.clear()                 # the scratch layout is built once per step: count it
                paged.attend(query, k_new, v_new, cache, out_new, step, rule, scale, prefill_rule=rule,
                             dense_kernel=cpu_prefill.dense_prefill)
            t_new = timed(plugin, args.repeat)
            run, isa = vllm_kernel(context, new, dtype, keys, values, query, scale)
            t_vllm = timed(run, args.repeat)
            diff = (out_new.float() - run().float()).abs().max().item()
            print(f"| {str(dtype).replace('torch.', '')} | {context} | {new} | {t_old:.1f} | {t_flash:.1f} | "
                  f"{t_new:.1f} | {t_vllm:.1f} ({isa}) | {t_old / t_vllm:.2f}x | {t_flash / t_vllm:.2f}x | "
                  f"{t_new / t_vllm:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
