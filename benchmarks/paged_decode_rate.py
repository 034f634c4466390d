"""The native paged decode kernel's KV read rate against this machine's read bandwidth.

A decode step's attention should be bound by memory: every kept key and value is read once. This
times the native kernel alone (no model) on the two layouts it serves and reports the bytes of KV it
reads per second, beside ``torch.sum``'s read rate over the same pools (what streaming memory gives):

* ``engine``: the engine's pools ``[P, 16, 1, D]`` (keys and values apart), one table per KV head,
  positions from ``pos_pool`` (``paged_decode``);
* ``vllm``: vLLM's CPU cache ``[P, Hkv, 128, 2 * D]`` (a slot's key and value side by side) read in place
  through ``paged.slot_pools``, vLLM's table in position order (``paged_decode_logical``).

Cases: SmolLM2-135M's heads (3 KV heads, 3 query heads each) at 8k x 8 and Qwen2.5-Coder-0.5B's (2 KV
heads, 7 query heads each) at 16k x 4, every key read (dense), plus a window of 1k, fp32 and bf16.

``--variant NAME=REV`` adds the kernel source of git revision REV (``paged_decode.c`` only, built
against this checkout's ``native.h``) as another column; variants run interleaved in one process, best
of ``--rounds`` per cell, so columns compare within one run on a shared machine::

    python benchmarks/paged_decode_rate.py [--variant before=HEAD~1] [--rounds 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/paged_decode_rate.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import (add_kernel_ab_arguments, kernel_columns, mean_seconds, provenance,  # noqa: E402
                               provenance_line)
from headwise.integrations.vllm.paged import slot_pools  # noqa: E402
from headwise.kernels.paged_decode import native  # noqa: E402

KERNEL = "headwise/kernels/paged_decode/paged_decode.c"
#: (layout, batch, KV heads, query heads per KV head, context, window or None for every key)
CASES = [
    ("engine", 8, 3, 3, 8192, None), ("engine", 4, 2, 7, 16384, None), ("engine", 8, 3, 3, 8192, 1024),
    ("vllm", 8, 3, 3, 8192, None), ("vllm", 4, 2, 7, 16384, None), ("vllm", 8, 3, 3, 8192, 1024),
]
D = 64


def make_case(layout: str, B: int, Hkv: int, G: int, N: int, window: int | None, dtype: torch.dtype):
    """``(call, kv_bytes_read, pool)``: one decode call over a random cache of ``layout``."""
    g = torch.Generator().manual_seed(0)
    span = N if window is None else window
    sink = torch.full((Hkv,), 0 if window is None else 64, dtype=torch.long)
    spans = torch.full((B, Hkv), span, dtype=torch.long)
    q = torch.randn(B, Hkv * G, D, generator=g)
    q_pos = torch.full((B,), N - 1, dtype=torch.long)
    kept = min(N, span + int(sink[0]))
    if layout == "engine":
        bs = 16
        nb = -(-N // bs)
        P = B * Hkv * nb + 1
        k = torch.randn(P, bs, 1, D, generator=g).to(dtype)
        v = torch.randn(P, bs, 1, D, generator=g).to(dtype)
        blocks = (torch.randperm(P - 1, generator=g)[: B * Hkv * nb] + 1).reshape(B, Hkv, nb)
        pos = torch.full((P, bs), -1, dtype=torch.long)
        pos[blocks] = (torch.arange(nb)[:, None] * bs + torch.arange(bs)).expand(B, Hkv, nb, bs)
        tables = blocks.int()
        call = lambda: native.paged_decode(q, k, v, pos, tables, q_pos, sink, spans, D ** -0.5)  # noqa: E731
        pool = torch.stack([k, v])
    else:
        bs = 128
        nb = -(-N // bs)
        P = B * nb + 1
        pool = torch.randn(P, Hkv, bs, 2 * D, generator=g).to(dtype)
        k, v = slot_pools(pool)
        table = (torch.randperm(P - 1, generator=g)[: B * nb] + 1).reshape(B, nb).int()
        call = lambda: native.paged_decode_logical(q, k, v, table, q_pos, sink, spans, D ** -0.5)  # noqa: E731
    return call, B * Hkv * kept * 2 * D * pool.element_size(), pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_kernel_ab_arguments(parser, "paged_decode.c")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the native paged_decode kernel does not build here; nothing to measure.")
    print(provenance_line(provenance()))
    with tempfile.TemporaryDirectory() as tmp:
        libs = kernel_columns(args.variant, KERNEL, native._library(), "paged_decode", Path(tmp))
        original = native._library
        header = "| layout | B x Hkv x G | context | keys read | dtype | read bw (torch.sum) | " + " | ".join(
            f"{name} ms | {name} GB/s | % of bw" for name, _ in libs) + " |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        try:
            for layout, B, Hkv, G, N, window in CASES:
                for dtype in (torch.float32, torch.bfloat16):
                    call, kv_bytes, pool = make_case(layout, B, Hkv, G, N, window, dtype)
                    flat = pool.view(-1)
                    best = [float("inf")] * len(libs)
                    stream = float("inf")
                    for _ in range(args.rounds):
                        for i, (_, lib) in enumerate(libs):
                            native._library = lambda lib=lib: lib
                            best[i] = min(best[i], mean_seconds(call))
                        stream = min(stream, mean_seconds(flat.sum, 0.1))
                    bandwidth = flat.numel() * flat.element_size() / stream / 1e9
                    cells = " | ".join(f"{t * 1e3:.2f} | {kv_bytes / t / 1e9:.1f} | {100 * kv_bytes / t / 1e9 / bandwidth:.0f}%"
                                       for t in best)
                    print(f"| {layout} | {B} x {Hkv} x {G} | {N} | {'all' if window is None else f'64 + {window}'} | "
                          f"{str(dtype).removeprefix('torch.')} | {bandwidth:.1f} GB/s | {cells} |", flush=True)
        finally:
            native._library = original


if __name__ == "__main__":
    main()
