"""Where an engine decode step goes: wall time around the linear kernel, the attention kernel, the
rest of each layer's attention call, the native decode layers (and, inside them, the C code's own
counters per part), the step plan and the lean forward, per decode step.

    python benchmarks/profile_decode_step.py [--plan smollm2-135m-d25] [--context 4096] [--batch 4]

Prints ms per decode step for each part (run on a quiet machine: it times, it does not count). The
timers wrap the engine's functions for the run only and are removed after it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/profile_decode_step.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import SHIPPED_D25, Setting, make_prompts, provenance, provenance_line  # noqa: E402
from headwise.engine import LLM, SamplingParams  # noqa: E402
from headwise.engine import lean, runner  # noqa: E402
from headwise.kernels import paged_decode as paged_decode_op  # noqa: E402
from headwise.kernels.paged_decode import native as paged_native  # noqa: E402
from headwise.kernels.skinny_linear import native as skinny_native  # noqa: E402
from headwise.models import load_model  # noqa: E402

try:                                         # checkouts before the native decode layers have none
    from headwise.kernels.decode_layer import native as layer_native  # noqa: E402
except ImportError:
    layer_native = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=SHIPPED_D25)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and KV dtype (the model is loaded in it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(provenance_line(provenance()))
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(dtype=dtype)
    prompts = [p[: args.context - args.steps - 16] for p in make_prompts(Setting(args.context, args.batch), tokenizer)]
    llm = LLM(model=model, plan=args.plan, kv_cache_memory="3GiB", max_num_seqs=max(8, args.batch),
              dtype=dtype)

    parts = {"linear (skinny_linear)": 0.0, "attention kernel (paged_decode)": 0.0,
             "layer_attention (incl. kernel)": 0.0, "native decode layers (run/pre/post)": 0.0, "step plan": 0.0,
             "lean forward (all of the above but plan)": 0.0}
    timing = {"on": False, "steps": 0}

    def timed(owner, name, part):
        inner = getattr(owner, name)

        def call(*a, **k):
            if not timing["on"]:
                return inner(*a, **k)
            start = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                parts[part] += time.perf_counter() - start
        setattr(owner, name, call)
        return inner

    originals = [
        (skinny_native, "skinny_linear", timed(skinny_native, "skinny_linear", "linear (skinny_linear)")),
        (paged_native, "paged_decode", timed(paged_native, "paged_decode", "attention kernel (paged_decode)")),
        (runner, "layer_attention", timed(runner, "layer_attention", "layer_attention (incl. kernel)")),
        (runner.ModelRunner, "build_plan", timed(runner.ModelRunner, "build_plan", "step plan")),
        (lean.LeanDecoder, "forward", timed(lean.LeanDecoder, "forward", "lean forward (all of the above but plan)")),
    ]
    if layer_native is not None:
        originals += [(layer_native.DecodeLayers, name, timed(layer_native.DecodeLayers, name,
                                                              "native decode layers (run/pre/post)"))
                      for name in ("run", "pre", "post")]
        layer_native.profile(False)                                      # reset the C counters
    native_backend = paged_decode_op.BACKENDS["native"]
    paged_decode_op.BACKENDS["native"] = paged_native.paged_decode
    run_step = runner.ModelRunner.run

    def run(self, batch, fresh):
        timing["on"] = all(seq.is_decoding for seq, _ in batch)
        timing["steps"] += timing["on"]
        if layer_native is not None:
            layer_native.profile(timing["on"], read=False)
        try:
            return run_step(self, batch, fresh)
        finally:
            timing["on"] = False
            if layer_native is not None:
                layer_native.profile(False, read=False)
    runner.ModelRunner.run = run
    try:
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(max_tokens=args.steps + 1, temperature=0.0, ignore_eos=True), use_tqdm=False)
    finally:
        runner.ModelRunner.run = run_step
        paged_decode_op.BACKENDS["native"] = native_backend
        for owner, name, inner in originals:
            setattr(owner, name, inner)
    stats, steps = llm.last_stats, max(1, timing["steps"])
    print(f"{args.plan}, {args.context} x {args.batch}, {args.dtype}: {stats.decode_tokens_per_second:.1f} tok/s, "
          f"{stats.decode_seconds / max(1, stats.decode_steps) * 1e3:.1f} ms per decode step, "
          f"{stats.peak_kv_bytes / 1e6:.0f} MB of KV held")
    for part, seconds in parts.items():
        print(f"  {part:42s} {seconds / steps * 1e3:7.2f} ms/step")
    inside = layer_native.profile(False) if layer_native is not None else {}
    if any(inside.values()):
        print("  inside the native decode layers (C counters):")
        for part, seconds in inside.items():
            print(f"    {part:40s} {seconds / steps * 1e3:7.2f} ms/step")


if __name__ == "__main__":
    main()
