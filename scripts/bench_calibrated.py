"""Calibrated plan vs dense vs uniform sink + window at equal density, on the embedded SmolLM2.

Retrieval: passkey and multi-key needle-in-a-haystack (headwise.eval.tasks generators), greedy,
correct when the answer appears in the output. Perplexity: real-prose documents
(headwise.eval.tasks.perplexity), scored on the second half of each document (where a window
head has dropped the most). Prints a markdown table.

    flock /tmp/headwise-heavy.lock .venv/bin/python scripts/bench_calibrated.py \
        --plan plans/smollm2-135m-d25.json --lengths 2048,4096,8192 --trials 50

``--trials`` takes one count or one per length (``50,50,10``). ``--plan`` takes several plans
(comma-separated, e.g. calibrator v1 and v2) and ``--prefill sparse,dense`` runs each calibrated
plan in each prefill mode (``dense``: the prompt runs dense, the cache keeps only the plan's KV).
After the table it checks issue 3's targets for every calibrated row: retrieval >= 95% of dense
and >= 1.5x uniform where uniform is below dense, perplexity <= +3% of dense.

Perplexity is the second half of each document. In sparse prefill it is one forward; in dense
prefill one forward would be dense by construction, so the first half is prefilled (dense) and
the second half is fed through the cache in chunks of ``--ppl-chunk`` tokens (each chunk reads
the plan's kept KV of everything before it and its own tokens), which is what a dense-prefill
plan sees when it continues a document. The table also gives the mean prefill seconds of the
retrieval prompts per plan and length.

Note the calibration data and the perplexity documents both come from ``pydoc_data.topics`` (the
only long real prose available offline), so passages may overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def second_half_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """Summed next-token NLL over the second half of ``text``'s tokens, and that token count."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    half = nll[nll.shape[0] // 2:]
    return float(half.sum()), half.numel()


@torch.no_grad()
def chunked_second_half_nll(model, tokenizer, text: str, chunk: int) -> tuple[float, int]:
    """Like ``second_half_nll``, but the first half is one (prefill) forward with a cache and the
    second half is fed through that cache ``chunk`` tokens at a time."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    half = (ids.shape[1] - 1) // 2 + 1          # first scored target: token `half`, as in second_half_nll
    out = model(input_ids=ids[:, :half], use_cache=True)
    cache, last = out.past_key_values, out.logits[:, -1:]
    total, count = 0.0, 0
    for start in range(half, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        out = model(input_ids=piece, past_key_values=cache, use_cache=True)
        logits = torch.cat([last, out.logits[:, :-1]], 1).float()
        total += float(torch.nn.functional.cross_entropy(logits[0], piece[0], reduction="sum"))
        count += piece.shape[1]
        last = out.logits[:, -1:]
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", default=str(ROOT / "plans" / "smollm2-135m-d25.json"),
                        help="calibrated plan(s), comma-separated")
    parser.add_argument("--prefill", default=None, help="prefill modes to run each calibrated plan in, "
                        "comma-separated from sparse,dense (default: each plan's own)")
    parser.add_argument("--ppl-chunk", type=int, default=64, help="chunk of the dense-prefill perplexity")
    parser.add_argument("--density", type=float, default=None, help="uniform baseline density (default: the plan's)")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--trials", default="50", help="prompts per task and length (needle depths): one count, "
                        "or one per length")
    parser.add_argument("--ppl-docs", type=int, default=None,
                        help="perplexity documents per length (default: the retrieval trials)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--cache", default=None, help="JSONL of per-prompt results: reused and extended, so an "
                        "interrupted or repeated run only computes what is missing")
    parser.add_argument("--tasks", default="passkey,niah,perplexity")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generated tokens per retrieval prompt (default: the eval task's own budget)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tqdm import tqdm

    from headwise import load_model, load_plan, patch_model, unpatch_model
    from headwise.demo import greedy_passkey
    from headwise.eval import tasks as eval_tasks
    from headwise.eval.scoring import contains_all
    from headwise.eval.taskfiles import KINDS
    from headwise.plan import Plan

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    paths = [p.strip() for p in args.plan.split(",") if p.strip()]
    loaded = [load_plan(p, model) for p in paths]
    density = args.density if args.density is not None else float(loaded[0].calibration["density"])
    plans = {"dense": "dense", f"uniform {density:g}": f"uniform:{density}"}
    for path, plan in zip(paths, loaded):
        name = Path(path).stem if len({Path(p).stem for p in paths}) == len(paths) else \
            f"{Path(path).parent.name}/{Path(path).stem}"
        modes = [m.strip() for m in args.prefill.split(",")] if args.prefill else [plan.prefill]
        for mode in modes:
            plans[f"{name} ({mode} prefill)"] = dataclasses.replace(plan, prefill=mode)
    lengths = [int(x) for x in args.lengths.split(",")]
    trials = dict(zip(lengths, per_length(args.trials, lengths)))
    kinds = [k.strip() for k in args.tasks.split(",") if k.strip()]
    count = lambda kind, n: args.ppl_docs if kind == "perplexity" and args.ppl_docs is not None else trials[n]  # noqa: E731
    samples = {(k, n): eval_tasks.generate(k, tokenizer, n, count(k, n), args.seed) for n in lengths for k in kinds}
    store = ResultStore(Path(args.cache) if args.cache else None)
    keys = {name: plan_key(spec) for name, spec in plans.items()}
    results: dict[tuple[str, str, int], object] = {}
    prefill_times: dict[tuple[str, int], list[float]] = {}
    bar = tqdm(total=len(plans) * sum(len(s) for s in samples.values()), desc="bench", unit="prompt")
    started = time.perf_counter()
    for (kind, n), group in samples.items():          # length by length: partial runs are already useful
        for name, spec in plans.items():
            bar.set_postfix_str(f"{name} {kind} {n}")
            values = []
            patch_model(model, spec)
            try:
                budget = args.max_new_tokens or KINDS[kind].max_gen_toks
                for i, s in enumerate(group):
                    key = f"{keys[name]}|{kind}|{n}|{args.seed}|{i}|{budget}"
                    chunked = kind == "perplexity" and not isinstance(spec, str) and spec.prefill == "dense"
                    if chunked:
                        key += f"|chunk{args.ppl_chunk}"
                    if key not in store:
                        if chunked:
                            store[key] = chunked_second_half_nll(model, tokenizer, s.prompt, args.ppl_chunk)
                        elif kind == "perplexity":
                            store[key] = second_half_nll(model, tokenizer, s.prompt)
                        else:
                            text, _, prefill_s, _ = greedy_passkey(model, tokenizer, s.prompt, budget)
                            store[key] = {"ok": contains_all(list(s.answers), text) == 1.0,
                                          "prefill_s": round(prefill_s, 3)}
                    values.append(store[key])
                    bar.update()
            finally:
                unpatch_model(model)
            if kind == "perplexity":
                results[(name, kind, n)] = math.exp(sum(v[0] for v in values) / sum(v[1] for v in values))
            else:
                ok = [v["ok"] if isinstance(v, dict) else bool(v) for v in values]
                results[(name, kind, n)] = (sum(ok), len(ok))
                times = [v["prefill_s"] for v in values if isinstance(v, dict)]
                if times:
                    prefill_times.setdefault((name, n), []).extend(times)
    bar.close()
    seconds = time.perf_counter() - started
    print(f"\nSmolLM2-135M-Instruct, density {density:g}; plan {args.plan}; trials per length "
          f"{', '.join(f'{n}: {c}' for n, c in trials.items())} (perplexity: second half of each document); "
          f"{seconds:.0f} s\n")
    show = lambda r: f"{r[0]}/{r[1]}" if isinstance(r, tuple) else f"{r:.3f}"  # noqa: E731
    timed = [n for n in lengths if any((name, n) in prefill_times for name in plans)]
    print("| plan | " + " | ".join(f"{k} {n}" for k in kinds for n in lengths)
          + "".join(f" | prefill s {n}" for n in timed) + " |")
    print("|---|" + "---:|" * (len(kinds) * len(lengths) + len(timed)))
    mean = lambda xs: f"{sum(xs) / len(xs):.2f}" if xs else "-"  # noqa: E731
    for name, spec in plans.items():
        kept = ", ".join(f"{Plan.from_spec(spec, model).density(n):.3f}" for n in lengths)
        print(f"| {name} (density {kept}) | " + " | ".join(show(results[(name, k, n)]) for k in kinds for n in lengths)
              + "".join(f" | {mean(prefill_times.get((name, n), []))}" for n in timed) + " |")
    names = list(plans)
    checks = [line for calibrated in names[2:] for line in target_checks(results, *names[:2], calibrated, kinds, lengths)]
    print("\nTargets (calibrated vs dense and uniform):")
    for line in checks:
        print(f"- {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "plan": args.plan, "density": density, "trials": trials, "seconds": round(seconds, 1),
            "results": [{"plan": p, "task": k, "length": n, "value": v if not isinstance(v, tuple) else list(v)}
                        for (p, k, n), v in results.items()], "targets": checks}, indent=1))


def plan_key(spec) -> str:
    """Identity of a plan in the result cache: the spec string, or a hash of the plan's JSON."""
    if isinstance(spec, str):
        return spec
    return "plan-" + hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]


class ResultStore(dict):
    """Per-prompt results, appended to a JSONL file as they come (``None``: in memory only)."""

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


def per_length(text: str, lengths: list[int]) -> list[int]:
    """``"50"`` -> 50 at every length; ``"50,50,10"`` -> one count per length."""
    counts = [int(x) for x in text.split(",")]
    if len(counts) == 1:
        return counts * len(lengths)
    if len(counts) != len(lengths):
        raise SystemExit(f"--trials needs one count or one per length ({len(lengths)}), got {text!r}.")
    return counts


def target_checks(results: dict, dense: str, uniform: str, calibrated: str, kinds: list[str],
                  lengths: list[int]) -> list[str]:
    """Issue 3's targets, one line per task and length, with the margin by which each is met or missed."""
    lines = []
    for kind in kinds:
        for n in lengths:
            d, u, c = (results[(p, kind, n)] for p in (dense, uniform, calibrated))
            if kind == "perplexity":
                change = c / d - 1.0
                lines.append(f"{calibrated}: perplexity {n}: calibrated {c:.3f} vs dense {d:.3f} ({change:+.1%}; target <= +3%: "
                             f"{'met' if change <= 0.03 else 'missed'}); uniform {u:.3f} ({u / d - 1.0:+.1%})")
                continue
            acc = {p: r[0] / r[1] for p, r in ((dense, d), (uniform, u), (calibrated, c))}
            of_dense = acc[calibrated] / acc[dense] if acc[dense] else float("nan")
            line = (f"{calibrated}: {kind} {n}: calibrated {acc[calibrated]:.0%}, dense {acc[dense]:.0%}, uniform {acc[uniform]:.0%}; "
                    f"calibrated/dense {of_dense:.2f} (target >= 0.95: "
                    f"{'met' if acc[dense] and of_dense >= 0.95 else 'missed' if acc[dense] else 'n/a, dense 0'})")
            if acc[uniform] < acc[dense]:
                ratio = acc[calibrated] / acc[uniform] if acc[uniform] else float("inf") if acc[calibrated] else 0.0
                line += f"; calibrated/uniform {ratio:.2f} (target >= 1.5: {'met' if ratio >= 1.5 else 'missed'})"
            lines.append(line)
    return lines


if __name__ == "__main__":
    main()
