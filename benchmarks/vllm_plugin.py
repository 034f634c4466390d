"""vLLM dense vs vLLM + a headwise plan vs the headwise engine: decode tok/s, prefill s, KV blocks.

    flock /tmp/headwise-heavy.lock timeout 900 python benchmarks/vllm_plugin.py \\
        --cases 8192x8 --systems dense,plan,engine --json /tmp/bench_vllm.json

Every (system, case) runs in its own process (``--worker JOB``), with ``VLLM_CPU_OMP_THREADS_BIND=0-1
VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4`` and 2 torch threads, fp32, greedy,
``ignore_eos``. Prompts are ``benchmarks.common.make_prompts`` (the decode benchmark's prose
slices), cut to the model's context minus the decode steps minus vLLM's 16-token margin.

- ``dense`` / ``plan``: ``vllm.LLM(..., enable_prefix_caching=False)`` with vLLM's default chunked
  prefill, without / with ``additional_config={"headwise_plan": PLAN}``. The B requests are added to
  ``llm.llm_engine`` and the engine is stepped by hand (what ``LLM.generate`` does inside), noting
  when each step's outputs arrive: prefill = until every request has its first token (chunked
  prefill included); decode = the later steps, which hold only decode tokens, in which every request
  made a token (``common.FullBatchDecode``: requests that decoded during later prompts' prefill finish
  first, and the steps after that run a smaller batch). One pass, no second prefill (an earlier
  version split by ``max_tokens=1`` vs ``1+T`` differences; a 1 s drift in a 30 s prefill moved the
  decode rate by 40%). KV blocks:
  ``num_gpu_blocks`` is what vLLM allocated (all free at start); "used" is the peak over the run of
  vLLM's own ``vllm:kv_cache_usage_perc`` gauge times its block count, read after every step (the
  read is left out of the timings).
- ``engine``: ``benchmarks.decode.run_engine`` (``headwise.engine.LLM`` with the plan; times and
  peak KV from the engine's ``last_stats``).

The decode benchmark's ``vllm`` row runs the same worker (``vllm_row``, without the KV gauge).
``--json FILE`` keeps every row in FILE across invocations (run the cases one by one under the lock)
and the table printed is of all rows in it.
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

if __name__ == "__main__" and not __package__:   # python benchmarks/vllm_plugin.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import SHIPPED_D25, Setting, kv_bytes_per_token, make_prompts  # noqa: E402
from benchmarks.common import make_vllm_llm, provenance, provenance_line, step_vllm_batch, vllm_cpu_env  # noqa: E402
from benchmarks.common import warm_up_vllm  # noqa: E402

ENV = vllm_cpu_env(2, 4)
MARGIN = 16                                   # tokens vLLM's max_model_len keeps beyond prompt + decode


def bench_prompts(length: int, batch: int, decode_steps: int) -> list[list[int]]:
    """The decode benchmark's ``batch`` prose prompts of ``length`` tokens, cut to fit the context."""
    from transformers import AutoConfig, AutoTokenizer

    from headwise.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    context = AutoConfig.from_pretrained(embedded_model_dir(), local_files_only=True).max_position_embeddings
    limit = context - decode_steps - MARGIN
    return [p[:limit] for p in make_prompts(Setting(length, batch), tokenizer)]


def kv_usage(llm) -> float | None:
    """vLLM's ``vllm:kv_cache_usage_perc`` gauge (fraction of blocks in use), ``None`` before any step."""
    for metric in llm.get_metrics():
        if metric.name == "vllm:kv_cache_usage_perc":
            return metric.value
    return None


def vllm_row(model_dir: str, prompts: list[list[int]], steps: int, plan: str | None = None,
             track_kv: bool = False, dtype: str = "float32") -> dict:
    """One vLLM row in this process (a child: vLLM spawns its engine, it needs the ``__main__`` guard).

    ``track_kv`` turns vLLM's stats on and reads its KV usage gauge after every step (untimed)."""
    llm = make_vllm_llm(model_dir, plan, dtype, max(map(len, prompts)) + steps + MARGIN, max(8, len(prompts)),
                        disable_log_stats=not track_kv)
    warm_up_vllm(llm, prompts)
    run = step_vllm_batch(llm, prompts, steps, probe=(lambda: kv_usage(llm) or 0.0) if track_kv else None)
    decode, peak_usage = run["decode"], max(run["probes"], default=0.0)
    config = llm.llm_engine.vllm_config
    num_blocks = config.cache_config.num_gpu_blocks
    return {"prefill_s": run["prefill_s"], "decode_s": decode.seconds, "decode_tokens": decode.tokens,
            "decode_steps": decode.steps, "step_ms": [1000 * t for t in decode.step_seconds],
            "block_size": config.cache_config.block_size,
            "num_blocks": num_blocks, "peak_usage": peak_usage if track_kv else None,
            "blocks_used": round(peak_usage * (num_blocks - 1)) if track_kv and num_blocks else None,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "chunked_prefill": getattr(config.scheduler_config, "enable_chunked_prefill", None),
            "vllm_version": __import__("vllm").__version__, "tokens": run["tokens"]}


def engine_row(plan: str, prompts: list[list[int]], steps: int, length: int) -> dict:
    """The headwise engine row, through the decode benchmark's ``run_engine``."""
    import torch

    from benchmarks.decode import run_engine
    from headwise import load_model

    torch.set_num_threads(2)
    model, _ = load_model()
    row = run_engine("engine-plan", model, prompts, steps, Setting(length, len(prompts)), plan_spec=plan,
                     label="engine")
    if row.error:
        raise RuntimeError(row.error)
    return {"prefill_s": row.prefill_s, "decode_s": row.decode_s, "decode_tokens": row.decode_tokens,
            "decode_steps": row.decode_steps, "kv_held_bytes": row.kv_held_bytes,
            "dense_kv_bytes": row.dense_kv_bytes, "peak_blocks": row.extra.get("peak_blocks"),
            "num_blocks": row.extra.get("num_blocks"), "tokens": row.tokens}


def worker(job_path: str) -> None:
    """Run the row a job file describes and write its result where the job says."""
    job = json.loads(Path(job_path).read_text())
    if job["system"] == "engine":
        result = engine_row(job["plan"], job["prompts"], job["decode_tokens"], job["length"])
    else:
        result = vllm_row(job["model"], job["prompts"], job["decode_tokens"], job.get("plan"),
                          track_kv=job.get("track_kv", False), dtype=job.get("dtype", "float32"))
    result["prompt_tokens"] = len(job["prompts"][0])
    Path(job["result"]).write_text(json.dumps(result))


def table(rows: list[dict]) -> str:
    """Markdown table of all rows; ratios against the vLLM dense row of the same case."""
    from transformers import AutoConfig

    from headwise.models import embedded_model_dir

    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(embedded_model_dir(), local_files_only=True), itemsize=4)
    dense = {r["case"]: r for r in rows if r["system"] == "dense"}
    out = ["| system | case (prompt tokens) | prefill s | decode tok/s | decode vs vLLM dense | "
           "vLLM KV blocks used (peak) / allocated | KV MB held |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r["decode_tokens"] / r["decode_s"]
        ref = dense.get(r["case"])
        speed = f"{rate / (ref['decode_tokens'] / ref['decode_s']):.2f}x" if ref else "-"
        if r["system"] == "engine":
            blocks = "- (engine: own per-head pool)"
            held = r["kv_held_bytes"]
        else:
            blocks = f"{r['blocks_used']} / {r['num_blocks']} ({r['block_size']}-token blocks)"
            held = r["blocks_used"] * r["block_size"] * per_token
        out.append(f"| {r['name']} | {r['case']} ({r['prompt_tokens']}) | {r['prefill_s']:.1f} | {rate:.1f} | {speed} | "
                   f"{blocks} | {held / 2**20:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--plan", default=SHIPPED_D25)
    parser.add_argument("--cases", default="4096x4,8192x8", help="LENGTHxBATCH,...")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed (max_tokens = 1 + steps)")
    parser.add_argument("--systems", default="dense,plan,engine")
    parser.add_argument("--json", help="keep rows in this file across invocations; print all of them")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is stopped")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    from headwise.models import embedded_model_dir

    info = provenance()
    print(provenance_line(info), file=sys.stderr)
    plan_name = Path(args.plan).stem
    names = {"dense": "vLLM dense", "plan": f"vLLM + {plan_name}", "engine": f"headwise engine + {plan_name}"}
    env = {**os.environ, **ENV}
    env.pop("HEADWISE_PLAN", None)
    store = Path(args.json) if args.json else None
    rows = json.loads(store.read_text()) if store and store.exists() else []
    for case in args.cases.split(","):
        length, batch = (int(x) for x in case.split("x"))
        prompts = bench_prompts(length, batch, args.steps)
        for system in args.systems.split(","):
            with tempfile.TemporaryDirectory(prefix="headwise-vllm-") as tmp:
                job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
                job.write_text(json.dumps({"system": "engine" if system == "engine" else "vllm",
                                           "plan": None if system == "dense" else args.plan,
                                           "model": str(embedded_model_dir()), "prompts": prompts, "length": length,
                                           "decode_tokens": args.steps, "track_kv": True, "result": str(out)}))
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--worker", str(job)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=args.timeout)
                if proc.returncode != 0 or not out.exists():
                    sys.exit(f"{names[system]} at {case} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
                r = json.loads(out.read_text())
            r.update(system=system, name=names[system], case=case, wall_s=time.perf_counter() - t0, steps=args.steps,
                     measured=info["date"], commit=info["commit"], command=info["command"])
            rows = [x for x in rows if (x["system"], x["case"], x["name"]) != (system, case, r["name"])] + [r]
            print(f"{names[system]} {case}: prefill {r['prefill_s']:.1f} s, decode "
                  f"{r['decode_tokens'] / r['decode_s']:.1f} tok/s ({r['wall_s']:.0f} s wall)", file=sys.stderr, flush=True)
            if store:
                store.write_text(json.dumps(rows))
    by = {(r["system"], r["case"]): r for r in rows}
    for case in sorted({r["case"] for r in rows}):
        ref = by.get(("dense", case))
        for system in ("plan", "engine"):
            if ref and (system, case) in by:
                same = sum(a == b for a, b in zip(ref["tokens"], by[(system, case)]["tokens"]))
                print(f"{case}: {names[system]} gave the same greedy tokens as vLLM dense for {same}/{len(ref['tokens'])} "
                      "prompts", file=sys.stderr)
    print(f"fp32, greedy, {args.steps} decode steps per prompt, prefix caching off, 2 CPU threads")
    print(table(rows))


if __name__ == "__main__":
    main()
