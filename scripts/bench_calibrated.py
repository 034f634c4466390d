"""Calibrated plan vs dense vs uniform sink + window at equal density, on the embedded SmolLM2.

Retrieval: passkey and multi-key needle-in-a-haystack (headwise.eval.tasks generators), greedy,
correct when the answer appears in the output. Perplexity: real-prose documents
(headwise.eval.tasks.perplexity), scored on the second half of each document (where a window
head has dropped the most). Prints a markdown table.

    flock /tmp/headwise-heavy.lock .venv/bin/python scripts/bench_calibrated.py \
        --plan plans/smollm2-135m-d25.json --lengths 2048,4096,8192 --trials 50

Note the calibration data and the perplexity documents both come from ``pydoc_data.topics`` (the
only long real prose available offline), so passages may overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Prefill + cached greedy decode; with a patched model, spans sized for the final length."""
    from headwise import expected_length
    from headwise.patches import is_patched

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    sized = expected_length(model, ids.shape[1] + max_new_tokens) if is_patched(model) else contextlib.nullcontext()
    with sized:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def second_half_nll(model, tokenizer, text: str) -> tuple[float, int]:
    """Summed next-token NLL over the second half of ``text``'s tokens, and that token count."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    half = nll[nll.shape[0] // 2:]
    return float(half.sum()), half.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", default=str(ROOT / "plans" / "smollm2-135m-d25.json"), help="calibrated plan")
    parser.add_argument("--density", type=float, default=None, help="uniform baseline density (default: the plan's)")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--trials", type=int, default=50, help="prompts per task and length (needle depths)")
    parser.add_argument("--ppl-docs", type=int, default=None, help="perplexity documents per length (default: trials)")
    parser.add_argument("--tasks", default="passkey,niah,perplexity")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from tqdm import tqdm

    from headwise import load_model, load_plan, patch_model, unpatch_model
    from headwise.eval import tasks as eval_tasks
    from headwise.plan import Plan

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    calibrated = load_plan(args.plan, model)
    density = args.density if args.density is not None else float(calibrated.calibration["density"])
    plans = {"dense": "dense", f"uniform {density:g}": f"uniform:{density}", Path(args.plan).stem: calibrated}
    lengths = [int(x) for x in args.lengths.split(",")]
    kinds = [k.strip() for k in args.tasks.split(",") if k.strip()]
    docs = args.ppl_docs if args.ppl_docs is not None else args.trials
    samples = {(k, n): eval_tasks.generate(k, tokenizer, n, docs if k == "perplexity" else args.trials, args.seed)
               for k in kinds for n in lengths}
    results: dict[tuple[str, str, int], str] = {}
    bar = tqdm(total=len(plans) * sum(len(s) for s in samples.values()), desc="bench", unit="prompt")
    started = time.perf_counter()
    for name, spec in plans.items():
        patch_model(model, spec)
        try:
            for (kind, n), group in samples.items():
                if kind == "perplexity":
                    nll, count = 0.0, 0
                    for s in group:
                        bar.set_postfix_str(f"{name} {kind} {n}")
                        a, b = second_half_nll(model, tokenizer, s.prompt)
                        nll, count = nll + a, count + b
                        bar.update()
                    results[(name, kind, n)] = f"{math.exp(nll / count):.3f}"
                else:
                    correct = 0
                    for s in group:
                        bar.set_postfix_str(f"{name} {kind} {n}")
                        text = greedy(model, tokenizer, s.prompt, args.max_new_tokens)
                        correct += all(a in text for a in s.answers)
                        bar.update()
                    results[(name, kind, n)] = f"{correct}/{len(group)}"
        finally:
            unpatch_model(model)
    bar.close()
    print(f"\nSmolLM2-135M-Instruct, density {density:g}; plan {args.plan}; trials {args.trials} per task and length "
          f"(perplexity: {docs} documents, second half of each); {time.perf_counter() - started:.0f} s\n")
    header = "| plan | " + " | ".join(f"{k} {n}" for k in kinds for n in lengths) + " |"
    print(header)
    print("|---|" + "---:|" * (len(kinds) * len(lengths)))
    for name, spec in plans.items():
        kept = ", ".join(f"{Plan.from_spec(spec, model).density(n):.3f}" for n in lengths)
        print(f"| {name} (density {kept}) | " + " | ".join(results[(name, k, n)] for k in kinds for n in lengths)
              + " |")


if __name__ == "__main__":
    main()
