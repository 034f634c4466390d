"""KV held and decode step time of plans through ``patch_model`` at one long context (batch 1).

    python -m headwise.bench.plans_kv --plans dense,plans/smollm2-135m-d25.json,mixed.json --length 8192

Per plan: one prefill of ``--length`` prose tokens (not timed for the table), then ``--steps``
greedy decode steps timed one by one (median reported), and ``kv_bytes`` of the cache afterwards:
KV kept, allocated, and constant kind state (lightning). Run it under the heavy-job lock.
"""

from __future__ import annotations

import argparse
import statistics
import time


def measure(model, plan: str, ids, steps: int) -> dict:
    import torch

    from ..patches import expected_length, kv_bytes, patch_model, unpatch_model

    patch_model(model, plan)
    try:
        with torch.no_grad(), expected_length(model, ids.shape[1] + steps):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - t0
            cache, token, times = out.past_key_values, out.logits[:, -1:].argmax(-1), []
            for _ in range(steps):
                t0 = time.perf_counter()
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - t0)
                token = out.logits[:, -1:].argmax(-1)
            held = kv_bytes(cache)
    finally:
        unpatch_model(model)
    return {"plan": plan, "prefill_s": prefill, "step_ms": 1000 * statistics.median(times), **held}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plans", required=True, help="comma-separated plan specs (paths, 'dense', 'uniform:0.25')")
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    from ..data.prose import corpus_text
    from ..models import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    text = corpus_text()
    ids = tokenizer(text[len(text) // 2:], return_tensors="pt", add_special_tokens=False).input_ids[:, :args.length - 16]
    print(f"prompt {ids.shape[1]} tokens, {args.steps} decode steps, {args.threads} threads, fp32 model")
    print(f"{'plan':<48} {'prefill s':>9} {'step ms':>8} {'KV kept MiB':>11} {'KV alloc MiB':>12} {'state MiB':>9}")
    for plan in args.plans.split(","):
        r = measure(model, plan, ids, args.steps)
        print(f"{plan:<48} {r['prefill_s']:>9.1f} {r['step_ms']:>8.1f} {r['kept'] / 2**20:>11.1f} "
              f"{r['allocated'] / 2**20:>12.1f} {r['state'] / 2**20:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
