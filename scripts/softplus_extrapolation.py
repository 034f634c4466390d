"""Length extrapolation of softplus / re-weighted heads on the embedded model: perplexity and passkey.

One job per call, results appended to a JSONL file (one line per document or trial), so a run
resumes where it stopped and several configurations share one file::

    python scripts/softplus_extrapolation.py ppl --config dense --length 16384 --docs 1 --out R.jsonl
    python scripts/softplus_extrapolation.py passkey --config reweight-all-p3 --length 12288 --trials 10 --out R.jsonl
    python scripts/softplus_extrapolation.py table --out R.jsonl

``--trials`` sets the depths (``sweep_depths(trials)``); ``--limit`` runs only the first few of
the missing ones, so a long-context cell can be measured in parts at the same depths.

``--config`` is a name below or a plan JSON path. Documents and prompts come from the eval suite's
generators (``headwise.eval.tasks``: ``perplexity`` real-prose documents, ``passkey``). Perplexity is
per token, from one forward over each ``--length`` document: its first 4k / 8k / 12k tokens are the
4k / 8k / 12k documents (the generator nests documents of one seed), so the table reports the
perplexity of every prefix and of every 4k band. Runs on one thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python scripts/softplus_extrapolation.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

BAND = 1024
SCALE_LENGTH = 8192          # SmolLM2-135M's max_position_embeddings: the trained context


def named_plan(name: str, model):
    """The plan of a configuration name (``None``: the unpatched model)."""
    from headwise import load_plan
    from headwise.kinds.softplus import Softplus
    from headwise.plan import ModelInfo, Plan

    if name == "dense":
        return None
    if name.endswith(".json"):
        return load_plan(name, model)
    info = ModelInfo.of(model)
    if name.startswith("reweight-all-p"):            # exp kept, re-weighting ReLU(nA-1)^p on every head
        head = Softplus(nonlinearity="exp", scale="none", scale_length=SCALE_LENGTH, power=float(name[14:]))
    elif name == "logn-all":                          # exp, m = max(1, log n / log 8192): entropy-invariance scale
        head = Softplus(nonlinearity="exp", scale="log_floor", scale_length=SCALE_LENGTH)
    elif name.startswith("logn-reweight-all-p"):
        head = Softplus(nonlinearity="exp", scale="log_floor", scale_length=SCALE_LENGTH, power=float(name[19:]))
    elif name == "lssa-all":                          # softplus, m = log n / log 8192 (LSSA on a softmax model)
        head = Softplus(nonlinearity="softplus", scale="log", scale_length=SCALE_LENGTH)
    elif name.startswith("lssar-all-p"):
        head = Softplus(nonlinearity="softplus", scale="log", scale_length=SCALE_LENGTH, power=float(name[11:]))
    else:
        raise SystemExit(f"unknown config {name!r}: dense, reweight-all-p<P>, logn-all, logn-reweight-all-p<P>, "
                         "lssa-all, lssar-all-p<P> or a plan JSON path.")
    layers = tuple(tuple(head for _ in range(info.num_kv_heads)) for _ in range(info.num_layers))
    return Plan(info, layers, {"method": name})


def done_keys(path: Path) -> set:
    if not path.exists():
        return set()
    return {tuple(json.loads(line)["key"]) for line in path.read_text().splitlines() if line.strip()}


def append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def load(config: str):
    from headwise import load_model, patch_model

    model, tok = load_model()
    plan = named_plan(config, model)
    if plan is not None:
        patch_model(model, plan)
    return model, tok, plan


def run_ppl(args) -> None:
    from headwise.kinds.softplus.fit import token_losses
    from headwise.eval.tasks import perplexity

    path = Path(args.out)
    done = done_keys(path)
    todo = [i for i in range(args.docs) if ("ppl", args.config, args.length, i) not in done]
    if not todo:
        return
    model, tok, _ = load(args.config)
    docs = perplexity(tok, args.length, args.docs, seed=args.seed)
    for i in todo:
        ids = tok(docs[i].prompt, add_special_tokens=False, return_tensors="pt").input_ids[:, :args.length]
        t0, c0 = time.time(), time.process_time()
        nll = token_losses(model, ids)
        bands = [float(nll[s:s + BAND].sum()) for s in range(0, nll.shape[0], BAND)]
        counts = [int(nll[s:s + BAND].numel()) for s in range(0, nll.shape[0], BAND)]
        append(path, {"key": ["ppl", args.config, args.length, i], "task": "ppl", "config": args.config,
                      "length": args.length, "doc": i, "tokens": int(ids.shape[1]), "band": BAND,
                      "nll_sums": bands, "counts": counts, "wall_s": round(time.time() - t0, 1),
                      "cpu_s": round(time.process_time() - c0, 1)})
        print(f"ppl {args.config} doc {i}: {math.exp(float(nll.mean())):.3f} over {ids.shape[1]} tokens", flush=True)


def run_passkey(args) -> None:
    from headwise import expected_length
    from headwise.eval.tasks import passkey

    path = Path(args.out)
    done = done_keys(path)
    todo = [i for i in range(args.trials) if ("passkey", args.config, args.length, i) not in done]
    todo = todo[:args.limit] if args.limit is not None else todo
    if not todo:
        return
    model, tok, plan = load(args.config)
    samples = passkey(tok, args.length, args.trials, seed=args.seed)
    for i in todo:
        s = samples[i]
        ids = tok(s.prompt, add_special_tokens=False, return_tensors="pt").input_ids
        t0, c0 = time.time(), time.process_time()
        with torch.no_grad(), (expected_length(model, ids.shape[1] + args.new_tokens) if plan is not None
                               else torch.no_grad()):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        append(path, {"key": ["passkey", args.config, args.length, i], "task": "passkey", "config": args.config,
                      "length": args.length, "trial": i, "depth": s.depth, "tokens": int(ids.shape[1]),
                      "answer": s.answers[0], "response": text, "new_tokens": args.new_tokens,
                      "correct": s.answers[0] in text,
                      "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)})
        print(f"passkey {args.config} {args.length} trial {i} depth {s.depth:.2f}: {s.answers[0] in text} {text!r}",
              flush=True)


def table(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    ppl = [r for r in rows if r["task"] == "ppl"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cpu = sum(r["cpu_s"] for r in rows)
    if ppl:
        cuts = [4096, 8192, 12288, 16384]
        print("| config | docs | " + " | ".join(f"ppl first {c // 1024}k" for c in cuts) + " | "
              + " | ".join(f"band {a // 1024}-{b // 1024}k" for a, b in zip([0] + cuts, cuts)) + " |")
        print("|---|---:|" + "---:|" * (2 * len(cuts)))
        for config in configs:
            docs = [r for r in ppl if r["config"] == config]
            if not docs:
                continue

            def over(a, b):               # predicted tokens a..b-1 (band-aligned), all documents pooled
                if any(len(r["nll_sums"]) * BAND < b for r in docs):
                    return "-"
                nll = sum(sum(r["nll_sums"][a // BAND:b // BAND]) for r in docs)
                count = sum(sum(r["counts"][a // BAND:b // BAND]) for r in docs)
                return f"{math.exp(nll / count):.2f}"
            print(f"| {config} | {len(docs)} | " + " | ".join(over(0, c) for c in cuts) + " | "
                  + " | ".join(over(a, b) for a, b in zip([0] + cuts, cuts)) + " |")
    keys = [r for r in rows if r["task"] == "passkey"]
    if keys:
        lengths = sorted({r["length"] for r in keys})
        print("\n| config | " + " | ".join(f"passkey {n}" for n in lengths) + " |")
        print("|---|" + "---:|" * len(lengths))
        for config in configs:
            cells = []
            for n in lengths:
                got = [r["correct"] for r in keys if r["config"] == config and r["length"] == n]
                cells.append(f"{sum(got)}/{len(got)}" if got else "-")
            if any(c != "-" for c in cells):
                print(f"| {config} | " + " | ".join(cells) + " |")
    print(f"\nCPU time of all rows: {cpu / 60:.1f} core-minutes")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["ppl", "passkey", "table"])
    p.add_argument("--config", default="dense")
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--limit", type=int, default=None,
                   help="run at most this many of the missing trials (the depths still follow --trials)")
    p.add_argument("--new-tokens", type=int, default=16,
                   help="greedy tokens after the prompt (SmolLM2 writes a 5-digit key as 5 tokens after a 5-token preamble)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"ppl": run_ppl, "passkey": run_passkey, "table": table}[args.what](args)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
