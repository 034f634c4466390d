"""Mixture-of-Head (``moh``) plans vs dense on the embedded SmolLM2: quality and counted decode cost.

Per plan (``dense`` and every ``--plan``), through ``patch_model`` (routing in prefill and decode):

- **perplexity** of real-prose documents (``headwise.eval.tasks.perplexity``), scored on the second
  half of each document, as ``benchmarks/quality.py`` does;
- **passkey** retrieval (``headwise.eval.tasks.passkey``), greedy, correct when the key appears in
  the answer;
- **counted decode cost** of the passkey answers' decode steps, from the routing decisions of every
  step (``recording_routes``: the benchmark calls each routing group's ``route(q, query_pos)`` on the
  queries the group is given), not from timings: KV bytes read (a KV head is read when at least
  one of its query heads runs; kept tokens x head_dim x 2 (K and V) x ``--kv-bytes``) and attention
  FLOPs (``4 x head_dim x kept`` per query head that runs: scores and weighted values; "as run"
  counts every query head of a KV head that is read, which is what ``paged_decode`` computes).

    OMP_NUM_THREADS=1 python benchmarks/moh.py --plan moh0.9.json,moh0.75.json,moh0.5.json \\
        --lengths 2048,4096 --trials 20 --ppl-docs 3 --threads 1 --cache moh.jsonl --json moh.json

``--cache`` keeps per-prompt results in a JSONL file, so an interrupted run resumes where it stopped
(trials run in bit-reversed waves over lengths and tasks, so a partial run has spread needle depths).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/moh.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import (ResultStore, per_length, plan_key, provenance, provenance_line,  # noqa: E402
                               spread_rank)


@contextmanager
def recording_routes(model):
    """Inside, every forward of the patched ``model`` records, per layer, which (query head, token)
    pairs its routing groups ran: ``routes[layer] = (group, active [B, Hq, Q] bool)`` of the latest
    forward, from ``group.route(q, query_pos)`` on the queries the group is given (a routing group:
    one with a ``route`` method, i.e. the layer's ``moh`` pool). The groups' own outputs are untouched."""
    runtime = model._headwise["runtime"]
    routes: dict[int, tuple] = {}
    wrapped = []
    for index, layer in enumerate(runtime.layers):
        for group in layer.groups:
            if not hasattr(group, "route"):
                continue
            inner = group.attention

            def attention(q, k, v, call, group=group, inner=inner, index=index):
                routes[index] = (group, group.route(q, call.query_pos))
                return inner(q, k, v, call)
            group.attention = attention               # on this instance only, removed on exit
            wrapped.append(group)
    try:
        yield routes
    finally:
        for group in wrapped:
            del group.attention


def decode_cost(plan, routes: dict, length: int, kv_bytes: int) -> dict:
    """Counted cost of the decode step that just ran at sequence length ``length`` (after its token),
    from that step's ``routes`` (``recording_routes``): a head outside a routing group runs its
    whole query group."""
    info = plan.model
    G, D = info.num_heads // info.num_kv_heads, info.head_dim
    cost = dict(kv_bytes=0, kv_bytes_dense=0, flops=0, flops_run=0, flops_dense=0, pairs=0, pairs_dense=0,
                groups=0, groups_dense=0)
    for index, specs in enumerate(plan.layers):
        group, active = routes.get(index, (None, None))
        for h, spec in enumerate(specs):
            kept = spec.kept(length)
            if group is not None and h in group.heads:
                local = group.heads.index(h)
                runs = int(active[0, local * G:(local + 1) * G, -1].sum())
            else:
                runs = G
            read = runs > 0
            cost["kv_bytes"] += read * 2 * kept * D * kv_bytes
            cost["kv_bytes_dense"] += 2 * length * D * kv_bytes
            cost["flops"] += runs * 4 * D * kept
            cost["flops_run"] += read * G * 4 * D * kept
            cost["flops_dense"] += G * 4 * D * length
            cost["pairs"] += runs
            cost["pairs_dense"] += G
            cost["groups"] += read
            cost["groups_dense"] += 1
    return cost


@torch.no_grad()
def passkey_trial(model, tokenizer, spec, prompt: str, answers, budget: int, kv_bytes: int) -> dict:
    """Greedy answer of one passkey prompt under ``spec``; ``{"ok", "steps", <summed decode costs>}``."""
    from headwise import patch_model, unpatch_model
    from headwise.eval.scoring import contains_all
    from headwise.plan import Plan

    plan = Plan.from_spec(spec, model)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    ok = lambda tokens: contains_all(list(answers), tokenizer.decode(tokens, skip_special_tokens=True)) == 1.0  # noqa: E731
    patch_model(model, plan)
    try:
        with recording_routes(model) as routes:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens, totals = [int(token)], {}
            while len(tokens) < budget and tokens[-1] != tokenizer.eos_token_id and not ok(tokens):
                logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
                for name, value in decode_cost(plan, routes, ids.shape[1] + len(tokens), kv_bytes).items():
                    totals[name] = totals.get(name, 0) + value
                token = logits[:, -1:].argmax(-1)
                tokens.append(int(token))
    finally:
        unpatch_model(model)
    return {"ok": ok(tokens), "steps": len(tokens) - 1, **totals}


@torch.no_grad()
def perplexity_trial(model, tokenizer, spec, text: str) -> list:
    """``[summed NLL, tokens]`` over the second half of ``text`` under ``spec`` (one patched forward)."""
    from headwise import patch_model, unpatch_model

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    half = (ids.shape[1] - 1) // 2 + 1
    patch_model(model, spec)
    try:
        logits = model(input_ids=ids, use_cache=False).logits
    finally:
        unpatch_model(model)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")[half - 1:]
    return [float(nll.sum()), int(nll.numel())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", required=True, help="moh plan JSON files, comma-separated (dense always runs)")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--trials", default="20", help="passkey prompts per length (needle depths): one count or "
                        "one per length")
    parser.add_argument("--ppl-docs", default="3", help="perplexity documents per length: one count or one per length")
    parser.add_argument("--tasks", default="perplexity,passkey")
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per cached K/V value in the counted bytes")
    parser.add_argument("--cache", default=None, help="JSONL of per-prompt results (resume)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="print the table from --cache, compute nothing")
    args = parser.parse_args()
    print(provenance_line(provenance()))

    from tqdm import tqdm

    from headwise import load_model, load_plan
    from headwise.eval import tasks as eval_tasks
    from headwise.eval.taskfiles import KINDS

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    paths = [p.strip() for p in args.plan.split(",") if p.strip()]
    plans = {"dense": "dense", **{Path(p).stem: load_plan(p, model) for p in paths}}
    keys = {name: plan_key(spec) for name, spec in plans.items()}
    lengths = [int(x) for x in args.lengths.split(",")]
    kinds = [k.strip() for k in args.tasks.split(",") if k.strip()]
    store = ResultStore(Path(args.cache) if args.cache else None)
    counts = {"perplexity": dict(zip(lengths, per_length(args.ppl_docs, lengths, "--ppl-docs"))),
              "passkey": dict(zip(lengths, per_length(args.trials, lengths)))}
    started = time.perf_counter()
    if not args.report_only:
        samples = {(kind, n): eval_tasks.generate(kind, tokenizer, n, counts[kind][n], args.seed)
                   for n in lengths for kind in kinds}
        todo = sorted((spread_rank(i, len(group)), n, kind, i) for (kind, n), group in samples.items()
                      for i in range(len(group)))
        for _, n, kind, i in tqdm(todo, desc="bench", unit="prompt"):
            s = samples[(kind, n)][i]
            for name, spec in plans.items():
                key = f"{keys[name]}|{kind}|{n}|{args.seed}|{counts[kind][n]}|{i}|kv{args.kv_bytes}"
                if key in store:
                    continue
                if kind == "perplexity":
                    store[key] = perplexity_trial(model, tokenizer, spec, s.prompt)
                else:
                    store[key] = passkey_trial(model, tokenizer, spec, s.prompt, s.answers,
                                               KINDS["passkey"].max_gen_toks, args.kv_bytes)
    seconds = time.perf_counter() - started

    summary = {}
    for name, spec in plans.items():
        row = summary.setdefault(name, {})
        if name != "dense":
            cal = spec.calibration
            row["active"] = cal.get("active")
            row["heads_per_token"] = cal.get("active_query_heads_per_token")
            row["fit_seconds"] = cal.get("seconds")
        for n in lengths:
            for kind in kinds:
                values = [store.get(f"{keys[name]}|{kind}|{n}|{args.seed}|{counts[kind][n]}|{i}|kv{args.kv_bytes}")
                          for i in range(counts[kind][n])]
                values = [v for v in values if v is not None]
                if not values:
                    continue
                if kind == "perplexity":
                    row[f"ppl {n}"] = math.exp(sum(v[0] for v in values) / sum(v[1] for v in values))
                    row[f"ppl docs {n}"] = len(values)
                    continue
                row[f"passkey {n}"] = [sum(bool(v["ok"]) for v in values), len(values)]
                steps = sum(v["steps"] for v in values)
                if steps:
                    for what in ("kv_bytes", "kv_bytes_dense", "flops", "flops_run", "flops_dense", "pairs",
                                 "pairs_dense", "groups", "groups_dense"):
                        row[f"{what} {n}"] = sum(v.get(what, 0) for v in values) / steps
                    row[f"decode steps {n}"] = steps
    print(f"\nSmolLM2-135M-Instruct, moh plans vs dense; {seconds:.0f} s this run; K/V at {args.kv_bytes} bytes\n")
    head = ["plan", "query heads run"] + [f"ppl {n}" for n in lengths] + [f"passkey {n}" for n in lengths]
    head += [f"KV MB read/step {n}" for n in lengths] + [f"attn MFLOP/step {n} (as run)" for n in lengths]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    dense = summary["dense"]
    for name, row in summary.items():
        cells = [name, "100%" if name == "dense" else f"{row['heads_per_token'] / 270:.1%}" if row.get("heads_per_token")
                 else "?"]
        for n in lengths:
            ppl, base = row.get(f"ppl {n}"), dense.get(f"ppl {n}")
            cells.append("-" if ppl is None else f"{ppl:.3f}" + ("" if name == "dense" or not base else f" ({ppl / base - 1:+.1%})"))
        for n in lengths:
            r = row.get(f"passkey {n}")
            cells.append("-" if r is None else f"{r[0]}/{r[1]}")
        for n in lengths:
            b = row.get(f"kv_bytes {n}")
            cells.append("-" if b is None else f"{b / 1e6:.2f} ({b / row[f'kv_bytes_dense {n}']:.0%})")
        for n in lengths:
            f = row.get(f"flops {n}")
            cells.append("-" if f is None else f"{f / 1e6:.1f} ({f / row[f'flops_dense {n}']:.0%}); "
                         f"{row[f'flops_run {n}'] / 1e6:.1f} ({row[f'flops_run {n}'] / row[f'flops_dense {n}']:.0%})")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
