"""vLLM + headwise plans against vLLM dense: KV blocks held, prefill, decode, and a loaded server's throughput.

Two parts, every row in its own process (vLLM's engine core in that process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the block pool is read after every step; DESIGN §12), 2
threads (``VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0``), greedy, ``ignore_eos``,
prefix caching off:

* ``plans``: ``B`` prose prompts of ``L`` tokens (``--case 8192x8``; cut to the model's context minus
  the decode steps minus vLLM's 16-token margin), ``1 + --steps`` tokens each, with
  ``VLLM_CPU_KVCACHE_SPACE=4``, vLLM's default chunked prefill. Prefill = until every request has
  its first token; decode = the later steps in which every request made a token
  (``common.FullBatchDecode``). KV held = blocks in use
  (``pool.blocks_in_use``) times the bytes of one block of this run's pool (a plan's pool has other
  blocks than dense's: fewer layers per KV cache group), at the peak of the run and at the peak
  after every prompt is in. ``--hf-check K``: the patched HF model (``headwise.patch_model``, same
  dtype, spans by the current length like the plugin) runs the first K prompts in its own process
  and the row counts the prompts whose ``1 + steps`` greedy tokens agree: the same, or the same up to
  a step where the HF model's logits of the two tokens tie within one unit of the dtype's last place
  (``common.greedy_agreement``; an exact bf16 tie goes to the lower token id, so a greedy run's pick
  there is rounding). ``--reuse-rows`` re-runs only that check for rows already in ``--json``.
* ``profile``: the ``plans`` case (default 4096x4, 16 decode steps), every decode-only step timed
  whole and in parts by wall-clock wrappers (``step_timers``: vLLM's and headwise's attention
  ``forward``, ``do_kv_cache_update``, ``paged.attend``, ``PositionBuffer.fill``; the outermost call
  of each part only): the step's attention share, and the Amdahl bound of any plan's decode
  speed-up over dense (dense step / dense step without attention and KV write).
* ``pressure``: one KV budget for every system (``--kv-memory``, default 512MiB: vLLM's
  ``kv_cache_memory_bytes``, which ``VLLM_CPU_KVCACHE_SPACE`` sets in whole GiB only, and the
  engine's ``kv_cache_memory``), ``--requests`` prose prompts of ``--min-prompt``..``--max-prompt``
  tokens (seeded), ``--output-tokens`` each, all submitted at once or, with ``--arrival-rate R``, as a
  seeded Poisson stream of R requests/s (TTFT then counts from each request's arrival): peak
  requests running at once, preemptions (both recompute a preempted request), total time, completed
  requests/s, output tok/s, p50/p95 time to first token and per-token latency (every gap between a
  request's consecutive tokens; a preemption's stall is one long gap), KV held at the peak. Systems:
  ``dense`` / ``d25`` / a plan spec run on vLLM (``run_vllm_pressure``), ``engine:<plan>`` on the
  headwise engine (``run_engine_pressure``; ``PRESSURE_RUNNERS`` maps the two; ``engine:d25/sparse``
  prefills sparse). Defaults are issue 29's
  full size (32 requests of 4k-8k, 128 output tokens, 512 MiB). ``--kv-memory 256MiB,...,4GiB`` runs
  every system at each budget; ``report --plot sweep.png`` draws output tok/s against the budget.

Rows are kept in ``--json`` (run parts one by one under the heavy-job lock) and ``report`` writes
the markdown file (``benchmarks/results/<date>-vllm-memory.md``: date, commit, machine, commands,
tables)::

    flock /tmp/headwise-heavy.lock python benchmarks/vllm_memory.py plans --systems dense,d25,d50 \\
        --dtypes float32 --json /tmp/vllm_memory.json
    flock /tmp/headwise-heavy.lock python benchmarks/vllm_memory.py pressure \\
        --systems dense,d25,engine:dense,engine:d25 --kv-memory 512MiB --json /tmp/vllm_memory.json
    python benchmarks/vllm_memory.py report --json /tmp/vllm_memory.json --out benchmarks/results/...md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))                 # this checkout's headwise, for the children too
from benchmarks.common import greedy_agreement, make_vllm_llm, vllm_cpu_env, warm_up_vllm  # noqa: E402
from benchmarks.common import provenance as common_provenance  # noqa: E402

PLANS = {"d25": "smollm2-135m-d25", "d50": "smollm2-135m-d50"}      # shipped plans (headwise plan list)
MARGIN = 16                                       # tokens vLLM's max_model_len keeps beyond prompt + decode
BASE_ENV = {**vllm_cpu_env(2), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


# ---- prompts ----------------------------------------------------------------------------------
def tokenizer():
    from transformers import AutoTokenizer

    from headwise.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)


def prose_stream(tok, min_tokens: int) -> list[int]:
    """Token ids of the package's prose corpus (CPython's ``pydoc_data.topics``), repeated to ``min_tokens``."""
    from headwise.data.prose import corpus_text

    ids = tok(corpus_text(), add_special_tokens=False).input_ids
    while len(ids) < min_tokens:
        ids = ids + ids
    return ids


def case_prompts(length: int, batch: int, steps: int) -> list[list[int]]:
    """``batch`` consecutive prose slices of ``length`` tokens (BOS first), cut to fit the context."""
    from transformers import AutoConfig

    from headwise.models import embedded_model_dir

    tok = tokenizer()
    context = AutoConfig.from_pretrained(embedded_model_dir(), local_files_only=True).max_position_embeddings
    length = min(length, context - steps - 1 - MARGIN)
    stream = prose_stream(tok, (length - 1) * batch)
    return [[tok.bos_token_id, *stream[i * (length - 1):(i + 1) * (length - 1)]] for i in range(batch)]


def pressure_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """``n`` prose prompts of ``lo``..``hi`` tokens (seeded lengths), BOS first, at spread-out offsets."""
    tok = tokenizer()
    rng = random.Random(seed)
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    stream = prose_stream(tok, 4 * hi)
    stride = max(1, (len(stream) - hi) // n)
    return [[tok.bos_token_id, *stream[i * stride:i * stride + m - 1]] for i, m in enumerate(lengths)]


# ---- the rows (children) ------------------------------------------------------------------------
def make_llm(plan: str | None, dtype: str, max_model_len: int, max_num_seqs: int, extra: dict | None = None,
             **more):
    """``benchmarks.common.make_vllm_llm`` on the embedded model."""
    from headwise.models import embedded_model_dir

    return make_vllm_llm(embedded_model_dir(), plan, dtype, max_model_len, max_num_seqs, extra, **more)


def run_plans_row(spec: dict) -> dict:
    """One ``plans`` row: prefill s, decode tok/s, blocks in use per step (this process, in-process engine)."""
    from benchmarks.common import step_vllm_batch
    from headwise.integrations.vllm.pool import blocks_in_use, pool_layout

    prompts = case_prompts(spec["length"], spec["batch"], spec["steps"])
    llm = make_llm(spec["plan"], spec["dtype"], max(map(len, prompts)) + 1 + spec["steps"] + MARGIN,
                   max(8, len(prompts)), spec.get("extra"))
    warm_up_vllm(llm, prompts)
    run = step_vllm_batch(llm, prompts, spec["steps"], probe=lambda: blocks_in_use(llm))
    decode, layout = run["decode"], pool_layout(llm)
    return {"prefill_s": run["prefill_s"], "decode_s": decode.seconds, "decode_tokens": decode.tokens,
            "decode_steps": decode.steps, "used": run["probes"], "first_step": run["first_step"],
            "num_blocks": layout.num_blocks, "bytes_per_block": layout.bytes_per_block, "groups": layout.groups,
            "prompt_tokens": len(prompts[0]), "tokens": run["tokens"]}


#: What ``profile`` times inside a decode step: ``(module path, owner attribute path, part)``; an owner
#: reached from another timed call of the same part is not timed twice.
PROFILE_POINTS = (
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward", "attention"),
    ("headwise.integrations.vllm.cpu", "HeadwiseCPUImpl.forward", "attention"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update", "KV write"),
    ("headwise.integrations.vllm.cpu", "HeadwiseCPUImpl.do_kv_cache_update", "KV write"),
    ("headwise.integrations.vllm.paged", "attend", "of attention: headwise paged.attend"),
    ("headwise.integrations.vllm.paged", "PositionBuffer.fill", "of attention: positions (PositionBuffer.fill)"),
)


def step_timers(points=PROFILE_POINTS):
    """Wrap the functions of ``points`` with wall-clock timers (outermost call of each part only).

    Returns ``(totals, on, undo)``: ``totals[part]`` seconds while ``on["on"]`` is true, and ``undo()``
    that puts every function back. For the ``profile`` rows' own process only."""
    import importlib

    totals = {part: 0.0 for _, _, part in points}
    depth = {part: 0 for _, _, part in points}
    on = {"on": False}
    undo = []
    for module, path, part in points:
        owner = importlib.import_module(module)
        *outer, name = path.split(".")
        for attr in outer:
            owner = getattr(owner, attr)
        inner = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name)
        if inner is None:                     # inherited (not defined on this class): wrap what it resolves to
            inner = getattr(owner, name)

        def timed(*a, _inner=inner, _part=part, **k):
            if not on["on"] or depth[_part]:
                return _inner(*a, **k)
            depth[_part] += 1
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                totals[_part] += time.perf_counter() - t0
                depth[_part] -= 1
        had = name in owner.__dict__ if isinstance(owner, type) else True
        setattr(owner, name, timed)
        undo.append((owner, name, inner, had))

    def restore():
        for owner, name, inner, had in reversed(undo):
            if had:
                setattr(owner, name, inner)
            else:
                delattr(owner, name)
    return totals, on, restore


def run_profile_row(spec: dict) -> dict:
    """One ``profile`` row: decode steps of the ``plans`` case with the attention, KV-write and headwise
    kernel calls timed (``step_timers``); per decode step, ms of each part and of the whole step."""
    from vllm import SamplingParams

    totals, on, restore = step_timers()
    prompts = case_prompts(spec["length"], spec["batch"], spec["steps"])
    llm = make_llm(spec["plan"], spec["dtype"], max(map(len, prompts)) + 1 + spec["steps"] + MARGIN,
                   max(8, len(prompts)), spec.get("extra"))
    warm_up_vllm(llm, prompts)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1 + spec["steps"], temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    sched = __import__("headwise.integrations.vllm.pool", fromlist=["scheduler"]).scheduler(llm)
    steps = []
    try:
        while engine.has_unfinished_requests():
            decoding = all(r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running) and \
                not sched.waiting and len(sched.running) == len(prompts)
            on["on"] = decoding
            before = dict(totals)
            t0 = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - t0
            on["on"] = False
            if decoding:
                steps.append({"step": elapsed, **{k: totals[k] - before[k] for k in totals}})
    finally:
        restore()
    return {"steps": steps, "prompt_tokens": len(prompts[0])}


#: Candidates per step ``run_hf_check`` keeps for the token comparison.
TOP_CANDIDATES = 5


def run_hf_check(spec: dict) -> dict:
    """Greedy tokens of the patched HF model for the first ``spec["k"]`` prompts of the case, and at every
    step its best ``TOP_CANDIDATES`` ``(token, logit)`` (logits in the model's dtype, for
    ``common.greedy_agreement``)."""
    import torch

    from headwise import patch_model
    from headwise.models import load_model

    torch.set_num_threads(2)
    prompts = case_prompts(spec["length"], spec["batch"], spec["steps"])[:spec["k"]]
    model, _ = load_model(dtype=getattr(torch, spec["dtype"]))
    plan = spec["plan"]
    if spec.get("prefill"):
        from dataclasses import replace

        from headwise.plan import Plan

        plan = replace(Plan.from_spec(plan, model), prefill=spec["prefill"])
    patch_model(model, plan)
    out, tops = [], []
    with torch.no_grad():
        for p in prompts:
            res = model(input_ids=torch.tensor([p]), use_cache=True)
            cache, toks, top = res.past_key_values, [], []
            while True:
                logits = res.logits[0, -1]
                token = logits.argmax(-1)
                best = logits.topk(TOP_CANDIDATES)
                top.append([(int(i), float(v)) for i, v in zip(best.indices, best.values)])
                toks.append(int(token))
                if len(toks) == 1 + spec["steps"]:
                    break
                res = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            out.append(toks)
            tops.append(top)
    return {"tokens": out, "top": tops}


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """When each of ``n`` requests arrives, seconds from the start: all at 0 for ``rate == 0``, else a
    Poisson stream of ``rate`` requests per second (seeded exponential gaps, the first request at 0)."""
    if rate <= 0:
        return [0.0] * n
    rng = random.Random(seed + 1)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def latency_summary(arrivals: dict[str, list[float]], submitted: dict[str, float] | None = None) -> dict:
    """TTFT and per-token latency from each request's token arrival times (seconds since the start).

    ``arrivals[rid]`` lists when each of the request's output tokens arrived; ``submitted[rid]`` when the
    request arrived (default 0: all at once). TTFT = first token - submission; per-token latency =
    every gap between a request's consecutive tokens (a preempted request's stall is one long gap).
    Returns p50/p95 of both and the mean TTFT.
    """
    import statistics

    submitted = submitted or {}
    ttft = sorted(times[0] - submitted.get(rid, 0.0) for rid, times in arrivals.items() if times)
    gaps = sorted(b - a for times in arrivals.values() for a, b in zip(times, times[1:]))

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]

    return {"ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "mean_ttft_s": statistics.fmean(ttft) if ttft else None,
            "itl_p50_s": pct(gaps, 0.5), "itl_p95_s": pct(gaps, 0.95)}


def serve_arrivals(due: list[float], busy: Callable[[], bool], clock: Callable[[], float],
                   add: Callable[[int], None]) -> Iterator[None]:
    """A server's loop over requests arriving at ``due[i]`` seconds of ``clock()``: yields once per step to
    take, after calling ``add(i)`` for every request that has arrived; while ``busy()`` is false it sleeps
    until the next arrival. Ends when every request was added and ``busy()`` is false."""
    queued = 0
    while queued < len(due) or busy():
        if not busy():
            time.sleep(max(0.0, due[queued] - clock()))                            # idle until the next arrives
        while queued < len(due) and due[queued] <= clock():
            add(queued)
            queued += 1
        yield


def run_vllm_pressure(spec: dict) -> dict:
    """One ``pressure`` row through vLLM: requests submitted when they arrive (``arrival_times``: all at
    once or a Poisson stream), the engine stepped to the end.

    The KV space is ``spec["kv_bytes"]`` through ``kv_cache_memory_bytes`` (what
    ``VLLM_CPU_KVCACHE_SPACE`` sets, in whole GiB only)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from headwise.integrations.vllm.pool import blocks_in_use, pool_layout, scheduler

    prompts = pressure_prompts(spec["requests"], spec["min_prompt"], spec["max_prompt"], spec["seed"])
    budget = {"max_num_batched_tokens": spec["max_num_batched_tokens"]} if spec.get("max_num_batched_tokens") else {}
    llm = make_llm(spec["plan"], spec["dtype"], spec["max_prompt"] + spec["output_tokens"] + MARGIN, 256,
                   spec.get("extra"), kv_cache_memory_bytes=spec["kv_bytes"], **budget)
    llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=3, temperature=0.0),
                 use_tqdm=False)                                                            # warm-up, not timed
    engine, sched = llm.llm_engine, scheduler(llm)
    params = SamplingParams(max_tokens=spec["output_tokens"], temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
    due = arrival_times(len(prompts), spec.get("arrival_rate", 0.0), spec["seed"])
    submitted = {f"p{i}": t for i, t in enumerate(due)}
    outputs, preemptions, running, used = {}, {}, [], []
    arrivals: dict[str, list[float]] = {f"p{i}": [] for i in range(len(prompts))}
    untimed, step_log, last = 0.0, [], 0.0
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start - untimed                            # noqa: E731
    add = lambda i: engine.add_request(f"p{i}", {"prompt_token_ids": prompts[i]}, params)   # noqa: E731
    for _ in serve_arrivals(due, engine.has_unfinished_requests, clock, add):
        computed = {rid: req.num_computed_tokens for rid, req in sched.requests.items()}
        outs = engine.step()
        now = clock()
        t0 = time.perf_counter()
        done = {o.request_id: len(o.prompt_token_ids or ()) + len(o.outputs[0].token_ids) - 1
                for o in outs if o.finished}                 # a finished request's computed tokens
        advanced = [(done.get(rid) or getattr(sched.requests.get(rid), "num_computed_tokens", n)) - n
                    for rid, n in computed.items()]
        step_log.append((round(now - last, 4), sum(a for a in advanced if a > 1), sum(1 for a in advanced if a == 1)))
        last = now
        untimed += time.perf_counter() - t0
        for o in outs:
            made = len(o.outputs[0].token_ids)
            arrivals[o.request_id] += [now] * (made - len(arrivals[o.request_id]))
            if o.finished:
                outputs[o.request_id] = list(o.outputs[0].token_ids)
        t0 = time.perf_counter()
        running.append(len(sched.running))
        used.append(blocks_in_use(llm))
        for rid, req in sched.requests.items():
            preemptions[rid] = max(preemptions.get(rid, 0), req.num_preemptions)
        untimed += time.perf_counter() - t0
    total = time.perf_counter() - start - untimed
    layout = pool_layout(llm)
    config = engine.vllm_config
    return {"total_s": total, "output_tokens": sum(map(len, outputs.values())), "completed": len(outputs),
            "prompt_tokens": sum(map(len, prompts)), "peak_running": max(running),
            "preemptions": sum(preemptions.values()), "preempted_requests": sum(1 for v in preemptions.values() if v),
            "steps": len(running), "peak_used": max(used), "num_blocks": layout.num_blocks,
            "bytes_per_block": layout.bytes_per_block, "peak_kv_bytes": max(used) * layout.bytes_per_block,
            "pool_bytes": layout.num_blocks * layout.bytes_per_block, "groups": len(layout.groups),
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "step_log": step_log, "tokens": [outputs.get(f"p{i}", []) for i in range(len(prompts))],
            "last_arrival_s": due[-1], **latency_summary(arrivals, submitted)}


def engine_pressure(llm, prompts: list[list[int]], output_tokens: int, due: list[float] | None = None) -> dict:
    """Requests to a ``headwise.engine.LLM`` as they arrive (``due[i]`` seconds from the start; default all
    at once), stepped to the end (``LLM.add_request`` / ``LLM.step``): the ``pressure`` row.

    Same keys as ``run_vllm_pressure``. Requests running at once and preemptions are read around each
    ``llm.scheduler.schedule()`` (a wrapper on this instance only): running after the step is
    scheduled, and the requests it moved from running back to waiting.
    """
    from headwise.engine import SamplingParams

    due = due or [0.0] * len(prompts)
    sched = llm.scheduler
    running: list[int] = []
    preempted: dict[str, int] = {}
    schedule = sched.schedule

    def counted_schedule():
        before = {id(s) for s in sched.running}
        batch = schedule()
        for s in sched.waiting:
            if id(s) in before:
                preempted[s.request_id] = preempted.get(s.request_id, 0) + 1
        running.append(len(sched.running))
        return batch

    sched.schedule = counted_schedule
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    arrivals: dict[str, list[float]] = {}
    tokens: dict[str, list[int]] = {}
    submitted: dict[str, float] = {}
    made: dict[str, int] = {}

    def add(i: int) -> None:
        submitted[llm.add_request({"prompt_token_ids": prompts[i]}, params, str(i))] = due[i]

    try:
        start = time.perf_counter()
        clock = lambda: time.perf_counter() - start                                  # noqa: E731
        for _ in serve_arrivals(due, llm.has_unfinished_requests, clock, add):
            events = llm.step()
            now = clock()
            for event in events:
                arrivals.setdefault(event.request_id, []).append(now)
                tokens.setdefault(event.request_id, []).append(event.token_id)
                if event.finished:
                    made[event.request_id] = len(arrivals[event.request_id])
        total = clock()
    finally:
        del sched.schedule                                       # back to the class's method
    stats = llm.last_stats
    return {"total_s": total, "output_tokens": sum(made.values()), "completed": len(made),
            "prompt_tokens": sum(map(len, prompts)), "peak_running": max(running),
            "preemptions": sum(preempted.values()), "preempted_requests": len(preempted), "steps": len(running),
            "peak_used": stats.peak_blocks, "num_blocks": stats.num_blocks, "bytes_per_block": llm.block_bytes,
            "peak_kv_bytes": stats.peak_kv_bytes, "pool_bytes": stats.num_blocks * llm.block_bytes, "groups": None,
            "max_num_batched_tokens": llm.config.max_num_batched_tokens,
            "tokens": [tokens.get(str(i), []) for i in range(len(prompts))], "last_arrival_s": due[-1],
            **latency_summary(arrivals, submitted)}


def run_engine_pressure(spec: dict) -> dict:
    """One ``pressure`` row through the headwise engine: a KV pool of ``spec["kv_bytes"]`` bytes (keys,
    values and slot positions), 2 threads, the plan's own prefill mode unless the system's variant sets it."""
    import torch

    from headwise.engine import LLM, SamplingParams

    torch.set_num_threads(2)
    prompts = pressure_prompts(spec["requests"], spec["min_prompt"], spec["max_prompt"], spec["seed"])
    options = {"max_num_batched_tokens": spec["max_num_batched_tokens"]} if spec.get("max_num_batched_tokens") else {}
    options |= {ENGINE_EXTRA[key]: value for key, value in spec.get("extra", {}).items()}
    llm = LLM(None, spec["plan"] or "dense", kv_cache_memory=spec["kv_bytes"], max_num_seqs=256,
              dtype=spec["dtype"], **options)
    llm.generate([{"prompt_token_ids": prompts[0][:64]}], SamplingParams(max_tokens=3, temperature=0.0),
                 use_tqdm=False)                                                            # warm-up, not timed
    return engine_pressure(llm, prompts, spec["output_tokens"],
                           arrival_times(len(prompts), spec.get("arrival_rate", 0.0), spec["seed"]))


#: ``pressure`` runners by system kind: ``"vllm"`` (vLLM-cpu, dense or with a plan through the plugin) and
#: ``"engine"`` (the headwise engine); same spec in, same keys out. A system named ``engine:<plan>`` runs
#: on the engine, any other on vLLM.
PRESSURE_RUNNERS = {"vllm": run_vllm_pressure, "engine": run_engine_pressure}


def child(spec: dict) -> None:
    runner = {"plans": run_plans_row, "hf": run_hf_check, "profile": run_profile_row,
              "pressure": PRESSURE_RUNNERS.get(spec.get("runner"))}
    result = runner[spec["part"]](spec)
    Path(spec["out"]).write_text(json.dumps(result))


def run_child(spec: dict, env: dict[str, str], timeout: float) -> dict:
    """Run one row in a fresh process; its result dict (exits with the child's log tail if it failed)."""
    out = Path(f"/tmp/vllm_memory_{os.getpid()}_{time.monotonic_ns()}.json")
    spec = dict(spec, out=str(out))
    full_env = {**os.environ, **BASE_ENV, **env}
    full_env.pop("HEADWISE_PLAN", None)
    if "VLLM_CPU_KVCACHE_SPACE" not in env:                 # it would override kv_cache_memory_bytes
        full_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"row {spec['part']} {spec.get('name')} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result | {"wall_s": time.perf_counter() - t0}


# ---- provenance and the store -------------------------------------------------------------------
def provenance() -> dict:
    """``benchmarks.common.provenance()`` with vLLM's version and the load average (what a results file records)."""
    import vllm

    info = common_provenance()
    return info | {"machine": f"{info['machine']}, vllm {vllm.__version__}", "load": os.getloadavg()}


def load_store(path: str | None) -> list[dict]:
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else []


def save_row(path: str | None, rows: list[dict], row: dict) -> list[dict]:
    """Keep ``row`` in the store, in place of an earlier row of the same part, system, dtype, case and budget."""
    def key(r):
        return r["part"], r["name"], r.get("dtype"), r.get("case"), r.get("kv_bytes")
    rows = [r for r in rows if key(r) != key(row)] + [row]
    if path:
        Path(path).write_text(json.dumps(rows))
    return rows


#: System name suffixes: ``d25/union`` runs d25 with these ``--additional-config`` keys.
VARIANTS = {"union": {"headwise_kv_groups": "union"}, "whole": {"headwise_split_heads": False},
            "sparse": {"headwise_prefill": "sparse"}}
#: The ``--additional-config`` keys an ``engine:<plan>`` system also takes, as the engine's ``LLM`` argument.
ENGINE_EXTRA = {"headwise_prefill": "prefill"}


def plan_of(system: str) -> tuple[str | None, dict]:
    """``dense`` -> no plan; ``d25``/``d50`` -> the shipped plan; else a plan spec; ``/variant`` suffixes
    (``VARIANTS``) add ``--additional-config`` keys: ``(plan, extra config)``."""
    base, *variants = system.split("/")
    extra = {}
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r} in {system!r}; variants are {sorted(VARIANTS)}.")
        extra.update(VARIANTS[v])
    return (None if base == "dense" else PLANS.get(base, base)), extra


# ---- tables ---------------------------------------------------------------------------------------
def mb(x: float) -> str:
    return f"{x / 2 ** 20:.0f}"


def plans_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r["part"] == "plans"]
    dense = {(r["dtype"], r["case"]): r for r in rows if r["name"] == "dense"}
    out = ["| system | dtype | case (prompt tokens) | prefill s | decode tok/s | decode vs dense | KV groups | "
           "blocks in use at peak / pool (block MB) | KV MB held at peak | vs dense | KV MB held after prompts in "
           "(peak) | vs dense | greedy tokens agree with patched HF |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["case"], r["dtype"], r["name"] != "dense", r["name"])):
        ref = dense.get((r["dtype"], r["case"]))
        rate = r["decode_tokens"] / r["decode_s"]
        peak = max(r["used"]) * r["bytes_per_block"]
        after = max(r["used"][r["first_step"] + 1:-1] or [0]) * r["bytes_per_block"]
        if ref:
            ref_peak = max(ref["used"]) * ref["bytes_per_block"]
            ref_after = max(ref["used"][ref["first_step"] + 1:-1] or [0]) * ref["bytes_per_block"]
            speed = f"{rate / (ref['decode_tokens'] / ref['decode_s']):.2f}x"
            vs_peak, vs_after = f"{peak / ref_peak:.0%}", f"{after / ref_after:.0%}" if ref_after else "-"
        else:
            speed = vs_peak = vs_after = "-"
        hf = f"{r['hf_same']}/{r['hf_k']}" if r.get("hf_k") else "-"
        if r.get("hf_ties"):
            hf += f" ({len(r['hf_ties'])} to a {r['dtype']} logit tie: step {', '.join(map(str, r['hf_ties']))})"
        out.append(f"| {r['name']} | {r['dtype']} | {r['case']} ({r['prompt_tokens']}) | {r['prefill_s']:.1f} | "
                   f"{rate:.1f} | {speed} | {len(r['groups'])} | {max(r['used'])} / {r['num_blocks']} "
                   f"({r['bytes_per_block'] / 2 ** 20:.2f}) | {mb(peak)} | {vs_peak} | {mb(after)} | {vs_after} | {hf} |")
    return "\n".join(out)


def _s(x: float | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x * scale, fmt)


def system_label(name: str) -> str:
    """A ``pressure`` system's name as tables and plots show it: ``engine:d25`` -> "headwise engine d25"."""
    if name.startswith("engine:"):
        return "headwise engine " + name.split(":", 1)[1]
    return "vLLM dense" if name == "dense" else f"vLLM + {name}"


def pressure_table(rows: list[dict]) -> str:
    """Markdown table of the ``pressure`` rows; ratios against the vLLM dense row of the same case."""
    rows = [r for r in rows if r["part"] == "pressure"]
    dense = {(r["dtype"], r["case"], r["kv_bytes"]): r for r in rows if r["name"] == "dense"}
    out = ["| system | dtype | KV budget MiB | requests x (prompt tokens) + output | peak running | "
           "preemptions (requests) | total s | completed req/s | output tok/s | vs vLLM dense | TTFT p50 / p95 s | "
           "per-token latency p50 / p95 ms | KV MiB held at peak / pool |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"dense": 0, "engine:dense": 2}
    for r in sorted(rows, key=lambda r: (r["case"], r["dtype"], r["kv_bytes"], order.get(r["name"], 1 + 2 * r["name"].startswith("engine:")), r["name"])):
        rate = r["output_tokens"] / r["total_s"]
        ref = dense.get((r["dtype"], r["case"], r["kv_bytes"]))
        vs = f"{rate / (ref['output_tokens'] / ref['total_s']):.2f}x" if ref else "-"
        system = system_label(r["name"])
        out.append(f"| {system} | {r['dtype']} | {r['kv_bytes'] / 2**20:.0f} | {r['case']} ({r['prompt_tokens']}) | "
                   f"{r['peak_running']} | {r['preemptions']} ({r['preempted_requests']}) | {r['total_s']:.0f} | "
                   f"{r['completed'] / r['total_s']:.3f} | {rate:.2f} | {vs} | "
                   f"{_s(r['ttft_p50_s'])} / {_s(r['ttft_p95_s'])} | {_s(r['itl_p50_s'], 1e3, '.0f')} / "
                   f"{_s(r['itl_p95_s'], 1e3, '.0f')} | {mb(r['peak_kv_bytes'])} / {mb(r['pool_bytes'])} |")
    return "\n".join(out)


def profile_parts(row: dict) -> dict[str, float]:
    """ms per decode step of each part of a ``profile`` row, and ``rest`` = step - attention - KV write.

    Medians over the fastest half of the decode steps after the first two (which warm caches): on the
    shared machine another process's burst slows every part of a step alike (measured: 78 ms steps
    and 0.8-2.7 s steps in one row), and such steps say nothing about the step itself."""
    import statistics

    steps = row["steps"][2:] or row["steps"]
    steps = sorted(steps, key=lambda s: s["step"])[:max(1, (len(steps) + 1) // 2)]
    med = {k: 1e3 * statistics.median(s[k] for s in steps) for k in steps[0]}
    med["rest"] = statistics.median(1e3 * (s["step"] - s["attention"] - s["KV write"]) for s in steps)
    return med


def profile_table(rows: list[dict]) -> str:
    """Markdown table of the ``profile`` rows, with the Amdahl bound a plan's decode speed-up has over dense."""
    rows = [r for r in rows if r["part"] == "profile"]
    key = lambda r: (r["dtype"], r["case"], r.get("tag", ""))                  # noqa: E731
    dense = {key(r): profile_parts(r) for r in rows if r.get("system", r["name"]) == "dense"}
    out = ["| system | dtype | case | decode steps | ms / decode step | attention ms (share) | of it: headwise "
           "paged.attend ms | of it: positions ms | KV write ms | rest of the step ms | step vs dense | "
           "bound if attention + KV write cost 0 (dense step / rest) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["case"], r["dtype"], r.get("tag", ""), r.get("system", r["name"]) != "dense",
                                         r["name"])):
        m = profile_parts(r)
        ref = dense.get(key(r))
        vs = f"{ref['step'] / m['step']:.2f}x" if ref else "-"
        bound = f"{m['step'] / m['rest']:.2f}x" if r.get("system", r["name"]) == "dense" else "-"
        out.append(f"| {r['name']} | {r['dtype']} | {r['case']} ({r['prompt_tokens']}) | {len(r['steps'])} | "
                   f"{m['step']:.1f} | {m['attention']:.1f} ({m['attention'] / m['step']:.0%}) | "
                   f"{m['of attention: headwise paged.attend']:.1f} | "
                   f"{m['of attention: positions (PositionBuffer.fill)']:.1f} | {m['KV write']:.1f} | {m['rest']:.1f} | "
                   f"{vs} | {bound} |")
    return "\n".join(out)


def report(rows: list[dict]) -> str:
    provs = {}
    for r in rows:
        for p in (r["prov"], r.get("hf_prov")):
            if p:
                provs.setdefault(p["command"], p)
    lines = ["# vLLM + headwise plans: KV memory, prefill, decode, memory pressure", ""]
    lines += [f"- {p['date']}; commit {p['commit']}; {p['machine']}; load average at start "
              f"{p['load'][0]:.1f}; `{p['command']}`" for p in provs.values()]
    if any(r["part"] == "plans" for r in rows):
        lines += ["", "## Plans at a fixed load (KV space 4 GiB, prefix caching off, greedy)", "", plans_table(rows)]
    if any(r["part"] == "profile" for r in rows):
        lines += ["", "## Where a decode step goes (ms per decode-only step: median of the fastest half; "
                  "wall-clock timers)", "",
                  profile_table(rows)]
    if any(r["part"] == "pressure" for r in rows):
        lines += ["", "## Memory pressure (one KV budget for every system in a row group; arrivals in the case)",
                  "", pressure_table(rows)]
    return "\n".join(lines) + "\n"


# ---- commands ---------------------------------------------------------------------------------------
def cmd_plans(args) -> None:
    import torch

    rows = load_store(args.json)
    length, batch = (int(x) for x in args.case.split("x"))
    prov = provenance()
    for dtype in args.dtypes.split(","):
        for system in args.systems.split(","):
            plan, extra = plan_of(system)
            spec = {"part": "plans", "name": system, "plan": plan, "extra": extra, "dtype": dtype, "length": length,
                    "batch": batch, "steps": args.steps}
            # --reuse-rows: a stored row's vLLM figures and tokens; the HF check runs again
            r = next((x for x in rows if (x["part"], x["name"], x["dtype"], x["case"], x.get("steps")) ==
                      ("plans", system, dtype, args.case, args.steps)), None) if args.reuse_rows else None
            if r is None:
                r = run_child(spec, {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_space)}, args.timeout)
                r.update(part="plans", name=system, dtype=dtype, case=args.case, plan=plan, extra=extra, prov=prov,
                         steps=args.steps)
            if plan and args.hf_check:
                prefill = extra.get("headwise_prefill")
                hf = run_child({"part": "hf", "name": system, "plan": plan, "prefill": prefill, "dtype": dtype,
                                "length": length, "batch": batch, "steps": args.steps, "k": args.hf_check}, {},
                               args.timeout)
                checks = [greedy_agreement(ref, top, got, getattr(torch, dtype))
                          for ref, top, got in zip(hf["tokens"], hf["top"], r["tokens"])]
                r.update(hf_k=len(checks), hf_same=sum(agree for agree, _ in checks),
                         hf_ties=[step for agree, step in checks if agree and step is not None], hf_prov=prov)
            print(f"{system} {dtype} {args.case}: prefill {r['prefill_s']:.1f} s, decode "
                  f"{r['decode_tokens'] / r['decode_s']:.1f} tok/s, peak {max(r['used'])} blocks of "
                  f"{r['bytes_per_block'] / 2**20:.2f} MB ({r['wall_s']:.0f} s wall)", file=sys.stderr, flush=True)
            rows = save_row(args.json, rows, r)
    print(plans_table(rows))


def cmd_profile(args) -> None:
    rows = load_store(args.json)
    length, batch = (int(x) for x in args.case.split("x"))
    prov = provenance()
    for system in args.systems.split(","):
        plan, extra = plan_of(system)
        spec = {"part": "profile", "name": system, "plan": plan, "extra": extra, "dtype": args.dtype,
                "length": length, "batch": batch, "steps": args.steps}
        r = run_child(spec, {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_space)}, args.timeout)
        r.update(part="profile", name=f"{system} [{args.tag}]" if args.tag else system, system=system, tag=args.tag,
                 plan=plan, extra=extra, dtype=args.dtype, case=args.case, prov=prov)
        m = profile_parts(r)
        print(f"{system}: {m['step']:.1f} ms per decode step, attention {m['attention']:.1f}, KV write "
              f"{m['KV write']:.1f}, rest {m['rest']:.1f} ({r['wall_s']:.0f} s wall)", file=sys.stderr, flush=True)
        rows = save_row(args.json, rows, r)
    print(profile_table(rows))


def pressure_system(system: str) -> tuple[str, str | None, dict]:
    """``engine:<plan>`` -> the engine with that plan (``engine:d25/sparse``: with sparse prefill); anything else
    -> vLLM (``plan_of``): ``(runner, plan, extra)``."""
    if system.startswith("engine:"):
        plan, extra = plan_of(system.split(":", 1)[1])
        if set(extra) - set(ENGINE_EXTRA):
            raise SystemExit(f"{system!r}: the engine takes only the /sparse variant (its prefill mode); the others "
                             "are vLLM --additional-config keys.")
        return "engine", plan, extra
    return ("vllm", *plan_of(system))


def pressure_case(args) -> str:
    """The case label of a ``pressure`` run: requests, prompt lengths, output, arrivals, step size."""
    case = f"{args.requests} x {args.min_prompt}-{args.max_prompt} + {args.output_tokens}"
    if args.arrival_rate:
        case += f", Poisson {args.arrival_rate:g} req/s"
    if args.max_num_batched_tokens:
        case += f", steps of <= {args.max_num_batched_tokens} tokens"
    return case


def cmd_pressure(args) -> None:
    from headwise.engine.config import parse_bytes

    rows = load_store(args.json)
    prov = provenance()
    case = pressure_case(args)
    for kv_bytes in [parse_bytes(b) for b in args.kv_memory.split(",")]:
        for system in args.systems.split(","):
            runner, plan, extra = pressure_system(system)
            spec = {"part": "pressure", "runner": runner, "name": system, "plan": plan, "extra": extra,
                    "dtype": args.dtype, "requests": args.requests, "min_prompt": args.min_prompt,
                    "max_prompt": args.max_prompt, "output_tokens": args.output_tokens, "seed": args.seed,
                    "kv_bytes": kv_bytes, "max_num_batched_tokens": args.max_num_batched_tokens,
                    "arrival_rate": args.arrival_rate}
            r = run_child(spec, {}, args.timeout)
            r.update(part="pressure", name=system, plan=plan, extra=extra, dtype=args.dtype, kv_bytes=kv_bytes,
                     requests=args.requests, prov=prov, case=case, output_tokens_each=args.output_tokens,
                     arrival_rate=args.arrival_rate)
            print(f"{system} {kv_bytes / 2**20:.0f} MiB: {r['total_s']:.0f} s, {r['output_tokens'] / r['total_s']:.2f} "
                  f"output tok/s, peak running {r['peak_running']}, preemptions {r['preemptions']} "
                  f"({r['wall_s']:.0f} s wall)", file=sys.stderr, flush=True)
            rows = save_row(args.json, rows, r)
    print(pressure_table(rows))


#: Colour and marker of each system's line in the budget-sweep plot.
SYSTEM_STYLE = {"dense": ("tab:gray", "o"), "d25": ("tab:blue", "s"), "engine:dense": ("tab:orange", "^"),
                "engine:d25": ("tab:red", "D"), "engine:d25/sparse": ("tab:purple", "v")}


def plot_budget_sweep(rows: list[dict], path: str | os.PathLike) -> list[str]:
    """Output tok/s against the KV budget, one line per system, one panel per pressure case and dtype with
    rows at two or more budgets (the ``pressure`` sweep). Writes a PNG; returns the panels' titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["part"] == "pressure"]
    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        panels.setdefault((r["case"], r["dtype"]), []).append(r)
    panels = {k: v for k, v in panels.items() if len({r["kv_bytes"] for r in v}) >= 2}
    if not panels:
        raise SystemExit("no pressure case was run at two or more KV budgets; run pressure with --kv-memory A,B,...")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    for ax, ((case, dtype), group) in zip(axes[0], sorted(panels.items())):
        for name in sorted({r["name"] for r in group}, key=lambda n: list(SYSTEM_STYLE).index(n)
                           if n in SYSTEM_STYLE else len(SYSTEM_STYLE)):
            line = sorted((r for r in group if r["name"] == name), key=lambda r: r["kv_bytes"])
            color, marker = SYSTEM_STYLE.get(name, (None, "x"))
            ax.plot([r["kv_bytes"] / 2**20 for r in line], [r["output_tokens"] / r["total_s"] for r in line],
                    marker=marker, color=color, label=system_label(name))
        ax.set_xscale("log", base=2)
        budgets = sorted({r["kv_bytes"] / 2**20 for r in group})
        ax.set_xticks(budgets, [f"{b / 1024:g} GiB" if b >= 1024 else f"{b:g} MiB" for b in budgets])
        ax.set_xlabel("KV memory budget")
        ax.set_ylabel("output tokens / s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{case}, {dtype}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Throughput in a fixed KV budget (SmolLM2-135M, 2 CPU threads)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f"{case}, {dtype}" for case, dtype in sorted(panels)]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("plans", help="plans vs dense at one case: prefill, decode, KV held")
    p.add_argument("--systems", default="dense,d25,d50",
                   help="dense, d25, d50 or plan specs, comma-separated; a /union, /whole or /sparse suffix adds "
                        "--additional-config keys (VARIANTS)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--case", default="8192x8", help="LENGTHxBATCH")
    p.add_argument("--steps", type=int, default=32, help="decode steps after the first token")
    p.add_argument("--kv-space", type=float, default=4, help="VLLM_CPU_KVCACHE_SPACE in GiB")
    p.add_argument("--hf-check", type=int, default=1, help="prompts checked against the patched HF model (0: none)")
    p.add_argument("--reuse-rows", action="store_true",
                   help="keep the vLLM rows already in --json for these systems, dtypes, case and steps; run only "
                        "the HF check again")
    p.set_defaults(func=cmd_plans)
    f = sub.add_parser("profile", help="where a decode step goes: attention, KV write, the rest (plans' case)")
    f.add_argument("--systems", default="dense,d25")
    f.add_argument("--dtype", default="float32")
    f.add_argument("--case", default="4096x4", help="LENGTHxBATCH")
    f.add_argument("--steps", type=int, default=16, help="decode steps after the first token")
    f.add_argument("--kv-space", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE in GiB")
    f.add_argument("--tag", default="", help="a label kept with the rows (runs of other code side by side)")
    f.set_defaults(func=cmd_profile)
    q = sub.add_parser("pressure", help="a loaded server: one KV budget (or a sweep), many long requests")
    q.add_argument("--systems", default="dense,d25,engine:dense,engine:d25",
                   help="vLLM systems as for plans; engine:<plan> runs the headwise engine with that plan")
    q.add_argument("--dtype", default="float32")
    q.add_argument("--kv-memory", default="512MiB",
                   help="KV bytes of every system: vLLM's kv_cache_memory_bytes, the engine's kv_cache_memory; "
                        "comma separated for a sweep (e.g. 256MiB,512MiB,1GiB,2GiB,4GiB), every system per budget")
    q.add_argument("--arrival-rate", type=float, default=0.0,
                   help="requests per second of a Poisson stream (seeded); 0: every request at once")
    q.add_argument("--requests", type=int, default=32)
    q.add_argument("--min-prompt", type=int, default=4096)
    q.add_argument("--max-prompt", type=int, default=7936, help="with the output and vLLM's margin, at most the context")
    q.add_argument("--output-tokens", type=int, default=128)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens one step may run, for every system (default: each one's own: vLLM-cpu 4096, "
                        "the engine 8192)")
    q.set_defaults(func=cmd_pressure)
    r = sub.add_parser("report", help="write the markdown results file from --json")
    r.add_argument("--out", help="markdown file (default: print)")
    r.add_argument("--append", help="markdown file added at the end (figures not in --json, with their provenance)")
    r.add_argument("--plot", help="also write the KV budget sweep's PNG (output tok/s against the budget) here")
    r.set_defaults(func=None)
    for s in (p, f, q, r):
        s.add_argument("--json", help="keep rows in this file across invocations")
        s.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    args = parser.parse_args()
    if args.func is not None:
        return args.func(args)
    text = report(load_store(args.json))
    if args.plot:
        panels = plot_budget_sweep(load_store(args.json), args.plot)
        print(f"wrote {args.plot} ({len(panels)} panel(s))")
        text += f"\n![output tok/s against the KV budget]({Path(args.plot).name})\n"
    if args.append:
        text += "\n" + Path(args.append).read_text()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
