"""vLLM dense vs vLLM + a headwise plan (vs the headwise engine when it exists): a markdown table.

    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4 \\
        python scripts/bench_vllm.py --plan plans/smollm2-135m-d25.json --cases 4096x4,8192x8

Each (system, case) runs in its own process: ``LLM(..., enable_prefix_caching=False)`` with a token
budget large enough for the whole batch, so all prompts are prefilled in one step and then decode
together. vLLM's per-request timestamps give prefill seconds (first scheduled -> first token) and
decode tokens/s (``B * (max_tokens - 1)`` over first token -> last token). KV blocks used =
``B * ceil((L + max_tokens) / block_size)`` blocks of ``block_size`` tokens, from vLLM's config; vLLM
allocates the same blocks with or without a plan (see the README, "Serve with vLLM").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}


def prompts(length: int, batch: int) -> list[list[int]]:
    """``batch`` different prompts of exactly ``length`` tokens of real prose (BOS first)."""
    from transformers import AutoTokenizer

    from headwise.models import embedded_model_dir
    from pydoc_data.topics import topics

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False).input_ids
    stride = max(1, (len(ids) - length) // max(1, batch))
    return [[tokenizer.bos_token_id, *ids[i * stride: i * stride + length - 1]] for i in range(batch)]


def run_vllm(plan: str | None, length: int, batch: int, new: int, dtype: str) -> dict:
    """One vLLM run in this process (called in a child: vLLM needs the ``__main__`` guard)."""
    from vllm import LLM, SamplingParams

    from headwise.models import embedded_model_dir

    kwargs = dict(model=str(embedded_model_dir()), dtype=dtype, enable_prefix_caching=False,
                  max_model_len=length + new + 16, max_num_batched_tokens=batch * (length + new + 16),
                  max_num_seqs=max(batch, 8), disable_log_stats=False, seed=0)
    if plan:
        kwargs["additional_config"] = {"headwise_plan": plan}
    llm = LLM(**kwargs)
    batch_prompts = [{"prompt_token_ids": p} for p in prompts(length, batch)]
    llm.generate(batch_prompts[:1], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)   # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(batch_prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    wall = time.perf_counter() - t0
    m = [o.metrics for o in outs]
    first = max(x.first_token_ts for x in m)
    prefill = first - min(x.scheduled_ts for x in m)
    decode = sum(x.num_generation_tokens - 1 for x in m) / (max(x.last_token_ts for x in m) - first)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    return {"prefill_s": prefill, "decode_tok_s": decode, "wall_s": wall, "block_size": block,
            "kv_blocks": batch * -(-(length + new) // block),
            "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def run_engine(plan: str, length: int, batch: int, new: int) -> dict:
    """The headwise engine (``headwise.engine.LLM``) on the same prompts, when it exists.

    Prefill s: a ``max_tokens=1`` run; decode tok/s: ``B * (new - 1)`` over the extra time of a
    ``max_tokens=new`` run (two prefills, hence ``--engine-cases``).
    """
    import torch

    from headwise.engine import LLM, SamplingParams

    torch.set_num_threads(2)
    llm = LLM(model=None, plan=plan, kv_cache_memory="4GiB")
    batch_prompts = [{"prompt_token_ids": p} for p in prompts(length, batch)]
    t0 = time.perf_counter()
    llm.generate(batch_prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(batch_prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True), use_tqdm=False)
    full = time.perf_counter() - t0
    return {"prefill_s": prefill, "decode_tok_s": batch * (new - 1) / max(1e-9, full - prefill), "wall_s": full,
            "kv_blocks": None, "tokens": [list(o.outputs[0].token_ids) for o in outs]}


def child(args) -> None:
    spec = json.loads(args.child)
    if spec["system"] == "engine":
        result = run_engine(spec["plan"], spec["length"], spec["batch"], spec["new"])
    else:
        result = run_vllm(spec["plan"], spec["length"], spec["batch"], spec["new"], spec["dtype"])
    Path(spec["out"]).write_text(json.dumps(result))


def engine_available() -> bool:
    try:
        from headwise.engine import LLM, SamplingParams  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=str(ROOT / "plans" / "smollm2-135m-d25.json"))
    parser.add_argument("--cases", default="4096x4,8192x8", help="LENGTHxBATCH,...")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--systems", default="dense,plan,engine")
    parser.add_argument("--engine-cases", default="4096x4", help="cases with an engine row (it prefills twice)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    systems = args.systems.split(",")
    if "engine" in systems and not engine_available():
        print("headwise engine: not available (headwise.engine has no LLM yet); row skipped", file=sys.stderr)
        systems.remove("engine")
    names = {"dense": "vLLM dense", "plan": f"vLLM + {Path(args.plan).stem}", "engine": f"headwise engine + {Path(args.plan).stem}"}
    env = {**os.environ, **ENV}
    env.pop("HEADWISE_PLAN", None)
    rows = []
    for case in args.cases.split(","):
        length, batch = (int(x) for x in case.split("x"))
        results = {}
        for system in systems:
            if system == "engine" and case not in args.engine_cases.split(","):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp, "result.json")
                spec = {"system": system, "plan": None if system == "dense" else args.plan, "length": length,
                        "batch": batch, "new": args.new, "dtype": args.dtype, "out": str(out)}
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                      capture_output=True, text=True)
                if proc.returncode != 0 or not out.exists():
                    sys.exit(f"{names[system]} at {case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
                results[system] = json.loads(out.read_text())
                r = results[system]
                print(f"{names[system]} {case}: prefill {r['prefill_s']:.1f} s, decode {r['decode_tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
        for system in results:
            r = results[system]
            speed = r["decode_tok_s"] / results["dense"]["decode_tok_s"] if "dense" in results else float("nan")
            blocks = "-" if r.get("kv_blocks") is None else f"{r['kv_blocks']} x {r['block_size']} (of {r['num_gpu_blocks']})"
            rows.append(f"| {names[system]} | {length} | {batch} | {r['prefill_s']:.1f} | {r['decode_tok_s']:.1f} | "
                        f"{speed:.2f}x | {blocks} |")
        if "dense" in results and "plan" in results:
            same = sum(a == b for a, b in zip(results["dense"]["tokens"], results["plan"]["tokens"]))
            print(f"{case}: {same}/{batch} prompts gave the same tokens with and without the plan", file=sys.stderr)
    print(f"vLLM {args.dtype}, {args.new} new tokens per prompt, greedy, prefix caching off, 2 CPU threads")
    print("| system | context | batch | prefill s | decode tok/s | decode vs dense | KV blocks used (of total) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
