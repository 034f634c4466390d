"""``headwise demo``: passkey retrieval on the embedded model, dense vs plans, on the engine, as a table.

For each plan and context length the engine (``headwise.engine.LLM``) runs one batch of passkey
prompts (one per needle depth, greedy, ``max_tokens`` new tokens each) and the table reports how
many passkeys came back, the KV each request held at its peak against what a dense cache holds for
the same tokens, prefill seconds per prompt and milliseconds per decode step of the batch
(decode-only steps).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

#: plans the demo always compares: name -> plan spec
DEFAULT_PLANS = {"dense": "dense", "uniform 25%": "uniform:0.25", "calibrated 25%": "d25"}
DEFAULT_LENGTHS = (2048, 4096)
LONG_LENGTH = 8192


@dataclass
class PasskeyRun:
    """Results of one plan at one length (one engine batch of ``trials`` prompts)."""

    plan: str
    length: int
    correct: int
    trials: int
    kept_mb: float           # mean over the batch's requests of the KV held at each one's peak, MiB
    dense_mb: float          # what a dense cache holds for the same tokens, MiB
    prefill_s: float         # prefill seconds per prompt
    decode_ms: float         # milliseconds per decode-only step of the batch


def run_passkey(model, tokenizer, plans: dict[str, object], lengths: list[int], depths: list[float],
                max_tokens: int = 16, seed: int = 0, kv_cache_memory: str = "2GiB") -> list[PasskeyRun]:
    """Passkey accuracy and cost of each plan (``name -> Plan | spec``) at each length, on the engine.

    Prompts are built once per length (``headwise.eval.passkey``, one per depth) and the same ones go
    to every plan. A progress bar counts prompts.
    """
    from tqdm.auto import tqdm

    from .engine import LLM, SamplingParams
    from .eval.passkey import passkey_samples

    samples = {n: passkey_samples(tokenizer, n, depths, seed=seed + n) for n in lengths}
    # every request decodes max_tokens tokens (past an end-of-sequence token too), so each plan's
    # decode-only steps are as many and comparable
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    runs = []
    with tqdm(total=len(plans) * len(lengths) * len(depths), desc="passkey", unit="prompt") as bar:
        for name, plan in plans.items():
            llm = LLM(model, plan=plan, tokenizer=tokenizer, kv_cache_memory=kv_cache_memory)
            for n in lengths:
                bar.set_postfix_str(f"{name} at {n // 1024}k")
                prompts = [{"prompt_token_ids": tokenizer(s.prompt, add_special_tokens=False).input_ids}
                           for s in samples[n]]
                outs = llm.generate(prompts, params, use_tqdm=False)
                failed = [o.error for o in outs if o.error]
                if failed:
                    raise RuntimeError(f"the engine refused a demo prompt: {failed[0]}")
                stats = llm.last_stats
                correct = sum(s.answer in o.outputs[0].text for s, o in zip(samples[n], outs))
                runs.append(PasskeyRun(
                    name, n, correct, len(outs),
                    statistics.mean(o.kv["peak_bytes"] for o in outs) / 2**20,
                    statistics.mean(o.kv["dense_bytes"] for o in outs) / 2**20,
                    stats.prefill_seconds / len(outs),
                    1000 * stats.decode_seconds / max(1, stats.decode_steps)))
                bar.update(len(outs))
    return runs


def format_table(runs: list[PasskeyRun]) -> str:
    """Markdown table of passkey runs."""
    lines = ["| plan | context | passkey | KV held MiB (of dense) | prefill s/prompt | decode ms/step |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.plan} | {r.length} | {r.correct}/{r.trials} | {r.kept_mb:.1f} "
                     f"({100 * r.kept_mb / r.dense_mb:.0f}%) | {r.prefill_s:.2f} | {r.decode_ms:.1f} |")
    return "\n".join(lines)


def default_plans(extra: list[str]) -> dict[str, object]:
    plans: dict[str, object] = dict(DEFAULT_PLANS)
    for spec in extra:
        plans[Path(spec).stem if spec.endswith(".json") else spec] = spec
    return plans


def demo(args) -> int:
    from . import load_model
    from .cli import parse_lengths

    torch.manual_seed(0)
    lengths = parse_lengths(args.lengths) if args.lengths else list(DEFAULT_LENGTHS)
    if args.long and LONG_LENGTH not in lengths:
        lengths.append(LONG_LENGTH)
    print("loading the embedded model (the first run converts it from GGUF, ~35 s)...", flush=True)
    model, tokenizer = load_model()
    depths = [(i + 0.5) / args.depths for i in range(args.depths)]
    runs = run_passkey(model, tokenizer, default_plans(args.plan), lengths, depths, args.max_tokens)
    print()
    print(f"Passkey retrieval on the headwise engine, SmolLM2-135M-Instruct, {args.depths} needle depths per "
          f"length (one batch), greedy, {torch.get_num_threads()} CPU threads")
    print(format_table(runs))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="passkey retrieval on the embedded model: dense vs plans, on the engine",
                              description="Passkey retrieval on the embedded model with dense, uniform 25%% and the "
                                          "calibrated 25%% plan (d25), at 2k and 4k tokens (--long adds 8k).")
    p.add_argument("--plan", action="append", default=[],
                   help="another plan to compare: JSON path, shipped name or preset (repeatable; default: none)")
    p.add_argument("--lengths", default=None,
                   help="context lengths in tokens, comma separated (default: 2048,4096)")
    p.add_argument("--long", action="store_true", help="also run 8192 tokens (about 3x the demo's time)")
    p.add_argument("--depths", type=int, default=3, help="needle depths (prompts) per length (default: 3)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per prompt (default: 16)")
    from .cli import add_threads

    add_threads(p)
    p.set_defaults(func=demo)
