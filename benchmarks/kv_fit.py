"""What fits in one KV budget: requests of a context held at once, per system, from each allocator's own accounting.

No forward runs: the numbers are what each KV allocator hands out for a request of ``N`` tokens, so they
are exact for that allocator, and they are where a loaded server hits its memory wall.

* **engine** (dense, or a plan): the engine's pool (``EngineConfig.kv_cache_memory`` bytes; blocks of
  ``--engine-block-size`` tokens of one KV head, plus 8 bytes of slot position per token) and a
  request's ``Sequence.max_blocks`` at its target length: every window head keeps its sink and a ring of
  its span, rounded up to whole blocks. A dense-prefill plan's prompt keys are step tensors, never pool
  blocks, so the pool holds the plan's KV only, at every step.
* **vllm** (dense, or a plan through the plugin): vLLM 0.32's KV cache groups for the specs the CPU
  plugin reports (``split.plan_specs``, ``get_kv_cache_groups``: the same rules as
  ``benchmarks/vllm_kv_groups.py``), pool blocks of the widest group's bytes. A dense-prefill plan holds
  its whole prompt until the prompt is in, so the request admitted last counts at its prompt's end.

For each context: requests held at once (and the KV bytes one request holds), and the longest single
context the budget holds (capped at the model's context; the uncapped figure beside it). The
engine's ``max_num_seqs`` (16 by default) and vLLM's ``max_num_seqs`` also cap a batch; raise them to
reach these counts. Activations (a 32k prompt's attention and MLP tensors) are outside the KV budget::

    python benchmarks/kv_fit.py --model qwen2.5-coder-0.5b --budget 8GiB --contexts 8192,16384,32768
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Tokens a request generates after its prompt (its target length is the context).
OUTPUT_TOKENS = 64


def engine_request_blocks(plan, context: int, block_size: int) -> int:
    """Pool blocks one engine request of ``context`` tokens holds at its peak (``Sequence.max_blocks``)."""
    from headwise.engine.sampling import SamplingParams
    from headwise.engine.sequence import Sequence

    prompt = [0] * (context - OUTPUT_TOKENS)
    seq = Sequence(prompt, SamplingParams(max_tokens=OUTPUT_TOKENS), plan, block_size, max_length=context)
    return int(seq.max_blocks.sum())


def engine_fit(plan, budget: int, contexts: list[int], block_size: int, element: int, max_context: int) -> dict:
    """Requests held at once per context, bytes per request and the longest context, in the engine's pool."""
    from headwise.engine.block_manager import pool_size

    num_blocks, block_bytes = pool_size(budget, block_size, plan.model.head_dim, element)
    per_context = {n: engine_request_blocks(plan, n, block_size) for n in contexts}
    return {"pool_blocks": num_blocks, "block_bytes": block_bytes,
            "requests": {n: num_blocks // b for n, b in per_context.items()},
            "request_bytes": {n: b * block_bytes for n, b in per_context.items()},
            "longest": longest(lambda n: engine_request_blocks(plan, n, block_size) <= num_blocks, max_context)}


def vllm_fit(specs: dict, budget: int, contexts: list[int], max_context: int) -> dict:
    """The same for vLLM's KV cache groups of ``specs`` (layer name -> ``KVCacheSpec``)."""
    from benchmarks.vllm_kv_groups import bytes_per_block, cpu_kv_cache_groups, held_blocks

    groups = cpu_kv_cache_groups(specs)
    block_bytes = bytes_per_block(groups)
    num_blocks = budget // block_bytes

    def held(n: int, at_prompt_end: bool) -> int:
        return held_blocks(groups, n - OUTPUT_TOKENS, n, at_prompt_end)

    requests, request_bytes = {}, {}
    for n in contexts:
        decoding, prompt_end = held(n, False), held(n, True)
        # every request decodes at n but the last admitted, which holds its prompt's end
        requests[n] = 0 if prompt_end > num_blocks else 1 + (num_blocks - prompt_end) // decoding
        request_bytes[n] = decoding * block_bytes
    return {"pool_blocks": num_blocks, "block_bytes": block_bytes, "groups": len(groups), "requests": requests,
            "request_bytes": request_bytes,
            "longest": longest(lambda n: held(n, True) <= num_blocks, max_context)}


def longest(fits, cap: int) -> tuple[int, int]:
    """``(longest context <= cap that fits, longest that fits with no cap)`` by doubling then bisection."""
    if not fits(OUTPUT_TOKENS + 1):
        return 0, 0
    lo, hi = OUTPUT_TOKENS + 1, 2 * (OUTPUT_TOKENS + 1)
    while fits(hi) and hi < 1 << 26:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return min(lo, cap), lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="registry name (default: the embedded SmolLM2)")
    parser.add_argument("--plans", default=None, help="plan files or specs, comma-separated (default: the "
                        "model's shipped d25 and d50)")
    parser.add_argument("--budget", default="8GiB", help="KV bytes every system gets (e.g. 512MiB, 8GiB)")
    parser.add_argument("--contexts", default="8192,16384,32768")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--engine-block-size", type=int, default=None, help="default: EngineConfig's")
    parser.add_argument("--vllm-block-size", type=int, default=128, help="vLLM's block size (CPU default 128)")
    parser.add_argument("--no-vllm", action="store_true", help="engine rows only")
    args = parser.parse_args()

    import logging

    import torch
    from transformers import AutoConfig
    from headwise.engine.config import EngineConfig, parse_bytes
    from headwise.models import DEFAULT, get_entry, model_dir
    from headwise.plan import Plan

    logging.getLogger("vllm").setLevel(logging.ERROR)
    name = args.model or DEFAULT
    hf = AutoConfig.from_pretrained(model_dir(name), local_files_only=True)
    max_context = hf.max_position_embeddings
    contexts = [int(x) for x in args.contexts.split(",")]
    if max(contexts) > max_context:
        raise SystemExit(f"--contexts go up to {max(contexts)} tokens; {name} reads at most {max_context}.")
    budget = parse_bytes(args.budget)
    block_size = args.engine_block_size or EngineConfig.block_size
    stem = get_entry(name).name
    specs = (args.plans or f"{stem}-d25,{stem}-d50").split(",")
    plans = {"dense": Plan.dense(hf),
             **{Path(s).stem if s.endswith(".json") else s: Plan.from_spec(s, hf) for s in specs}}
    if not args.no_vllm:
        from benchmarks.vllm_kv_groups import dense_specs
        from headwise.integrations.vllm.kv_spec import register_kv_spec
        from headwise.integrations.vllm.split import plan_specs

        register_kv_spec()
    print(f"{name}: {hf.num_hidden_layers} layers x {plans['dense'].model.num_kv_heads} KV heads x head dim "
          f"{plans['dense'].model.head_dim}, context {max_context}; KV budget {args.budget} per system; "
          f"{OUTPUT_TOKENS} generated tokens per request\n")
    header = "| system | dtype | " + " | ".join(f"requests at {n}" for n in contexts) + " | " + \
        " | ".join(f"MiB / request at {n}" for n in contexts) + " | longest context (uncapped) |"
    print(header)
    print("|" + "---|" * (3 + 2 * len(contexts)))
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        element = torch.empty(0, dtype=dtype).element_size()
        rows = [(f"engine {p}", engine_fit(plan, budget, contexts, block_size, element, max_context))
                for p, plan in plans.items()]
        if not args.no_vllm:
            for p, plan in plans.items():
                layer_specs = (dense_specs(plan, args.vllm_block_size, dtype) if p == "dense"
                               else plan_specs(plan, args.vllm_block_size, dtype, max_context))
                rows.append((f"vLLM {p}", vllm_fit(layer_specs, budget, contexts, max_context)))
        for label, fit in rows:
            capped, uncapped = fit["longest"]
            print(f"| {label} | {dtype_name} | " + " | ".join(str(fit["requests"][n]) for n in contexts) + " | "
                  + " | ".join(f"{fit['request_bytes'][n] / 2**20:.0f}" for n in contexts)
                  + f" | {capped} ({uncapped}) |")


if __name__ == "__main__":
    main()
