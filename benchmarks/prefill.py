"""End-to-end prefill of the embedded model: patched at 25% density vs the unpatched sdpa model.

One run, same prompt (real prose: ``benchmarks.common.make_prompts``), repetitions interleaved
(sdpa, patched, patched + cache, sdpa, ...) so machine drift hits every column alike; prints the
median of each. Forwards use ``logits_to_keep=1`` like a generation prefill.

    python benchmarks/prefill.py [--length 8192] [--plan uniform:0.25] [--repeats 3] [--backend auto] [--threads N]

Columns: ``sdpa`` (the unpatched model), ``headwise`` (patched, ``use_cache=False``: attention only),
``headwise+cache`` (patched, ``use_cache=True``: also fills the per-head headwise cache, what
``generate`` does).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/prefill.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import Setting, make_prompts, provenance, provenance_line  # noqa: E402
from headwise import load_model, patch_model, unpatch_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--plan", default="uniform:0.25")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    print(provenance_line(provenance()))
    model, tokenizer = load_model()
    ids = torch.tensor(make_prompts(Setting(args.length, 1), tokenizer))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; prompt {ids.shape[1]} tokens; "
          f"plan {args.plan}; backend {args.backend}")

    def forward(patched: bool, use_cache: bool, ids: torch.Tensor = ids) -> float:
        if patched:
            patch_model(model, args.plan, backend=args.backend)
        try:
            with torch.no_grad():
                start = time.perf_counter()
                model(input_ids=ids, use_cache=use_cache, logits_to_keep=1)
                return time.perf_counter() - start
        finally:
            if patched:
                unpatch_model(model)

    variants = {"sdpa": (False, False), "headwise": (True, False), "headwise+cache": (True, True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for patched, use_cache in variants.values():          # warm-up on a short prompt, not timed
        forward(patched, use_cache, ids[:, :256])
    for rep in range(args.repeats):
        for name, (patched, use_cache) in variants.items():
            times[name].append(forward(patched, use_cache))
            print(f"  rep {rep + 1} {name:<15} {times[name][-1]:7.2f} s", flush=True)
    base = statistics.median(times["sdpa"])
    print(f"\n{'variant':<16} {'median s':>9} {'min s':>7} {'speedup vs sdpa':>16}")
    print("-" * 51)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<16} {median:>9.2f} {min(values):>7.2f} {base / median:>15.2f}x")


if __name__ == "__main__":
    main()
