"""The native skinny linear's weight read rate against this machine's read bandwidth.

A decode step multiplies a few token rows by every weight matrix, so its linears should be bound by
memory: each weight read once. This times the native kernel alone (no model) over every matrix of a
model's decoder layers in a row (more bytes than the last-level cache holds) and reports the weight
bytes it reads per second, beside ``torch.sum``'s read rate over the same weights (what streaming
memory gives). Shapes: SmolLM2-135M's 30 layers (hidden 576, 3 KV heads of 64, MLP 1536) or
Qwen2.5-Coder-0.5B's 24 (896, 2 KV heads of 64, MLP 4864); 4 and 8 token rows; fp32 and bf16 weights.

``--variant NAME=REV`` adds the kernel source of git revision REV (``skinny_linear.c`` only, built against
this checkout's ``native.h``) as another column; variants run interleaved in one process, best of
``--rounds`` per cell, so columns compare within one run on a shared machine::

    python benchmarks/skinny_linear_rate.py [--variant before=HEAD~1] [--model smollm2-135m] [--rounds 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/skinny_linear_rate.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import (add_kernel_ab_arguments, kernel_columns, mean_seconds, provenance,  # noqa: E402
                               provenance_line)
from headwise.kernels.skinny_linear import native  # noqa: E402

KERNEL = "headwise/kernels/skinny_linear/skinny_linear.c"
#: model -> (layers, hidden, query width, KV width, MLP width)
MODELS = {"smollm2-135m": (30, 576, 576, 192, 1536), "qwen2.5-coder-0.5b": (24, 896, 896, 128, 4864)}


def layer_weights(model: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every decoder matrix ``[out, in]`` of ``model`` (q, k, v, o, gate, up, down per layer), random."""
    layers, E, Q, KV, F = MODELS[model]
    g = torch.Generator().manual_seed(0)
    shapes = [(Q, E), (KV, E), (KV, E), (E, Q), (F, E), (F, E), (E, F)]
    return [torch.randn(o, i, generator=g).to(dtype) for _ in range(layers) for o, i in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_kernel_ab_arguments(parser, "skinny_linear.c")
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the native skinny_linear kernel does not build here; nothing to measure.")
    print(provenance_line(provenance()))
    with tempfile.TemporaryDirectory() as tmp:
        libs = kernel_columns(args.variant, KERNEL, native._library(), "skinny_linear", Path(tmp))
        header = "| model | rows | dtype | weights MB | read bw (torch.sum) | " + " | ".join(
            f"{name} ms | {name} GB/s | % of bw" for name, _ in libs) + " |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for dtype in (torch.float32, torch.bfloat16):
            weights = layer_weights(args.model, dtype)
            nbytes = sum(w.numel() * w.element_size() for w in weights)
            flat = torch.randn(sum(w.numel() for w in weights)).to(dtype)   # the same bytes in one stream
            for rows in (4, 8):
                xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
                ys = {w.shape[0]: torch.empty(rows, w.shape[0]) for w in weights}

                def run(lib) -> None:
                    for w in weights:
                        out, inp = w.shape
                        if lib.skinny_linear(xs[inp].data_ptr(), w.data_ptr(), None, ys[out].data_ptr(), rows, inp,
                                             out, int(dtype == torch.bfloat16)):
                            raise RuntimeError(f"skinny_linear refused {rows} rows")

                best = [float("inf")] * len(libs)
                stream = float("inf")
                for _ in range(args.rounds):
                    for i, (_, lib) in enumerate(libs):
                        best[i] = min(best[i], mean_seconds(lambda lib=lib: run(lib)))
                    stream = min(stream, mean_seconds(flat.sum, 0.1))
                bandwidth = nbytes / stream / 1e9
                cells = " | ".join(f"{t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {100 * nbytes / t / 1e9 / bandwidth:.0f}%"
                                   for t in best)
                print(f"| {args.model} | {rows} | {str(dtype).removeprefix('torch.')} | {nbytes / 1e6:.0f} | "
                      f"{bandwidth:.1f} GB/s | {cells} |", flush=True)


if __name__ == "__main__":
    main()
