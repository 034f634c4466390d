"""Greedy tokens of a bf16 engine against the fp32 engine's, on the embedded model and the shipped d25.

    python benchmarks/bf16_tokens.py [--prompts 8] [--prompt-tokens 256] [--tokens 32]

Prompts are distinct slices of the package's prose corpus. Rows: bf16 weights and KV with the native
decode layers (fp32 activations, fp32 accumulation) and bf16 with the torch decode ops (the HF
forward's rounding: every activation rounded to bf16). For each: tokens before the first difference
from fp32 (per prompt), and the share of the 32 positions whose token equals fp32's. Greedy text
that has diverged is no longer comparable position by position, so the first number matters most.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import SHIPPED_D25, provenance, provenance_line  # noqa: E402


def tokens(model, prompts, n, native: bool):
    from headwise.engine import LLM, SamplingParams

    llm = LLM(model, plan=SHIPPED_D25, kv_cache_memory="256MiB", max_num_seqs=len(prompts),
              dtype=next(model.parameters()).dtype)
    if not native and llm.runner.lean is not None:
        llm.runner.lean.native = None
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(provenance_line(provenance()))
    from headwise import load_model
    from headwise.data.prose import corpus_slice

    model, tokenizer = load_model()
    prompts = [corpus_slice(tokenizer, 3000 * i, args.prompt_tokens)[0].tolist() for i in range(args.prompts)]
    ref = tokens(model, prompts, args.tokens, True)
    half, _ = load_model(dtype=torch.bfloat16)
    print(f"{args.prompts} prose prompts of {args.prompt_tokens} tokens, {args.tokens} greedy tokens, d25 plan\n")
    print("| bf16 decode path | tokens before the first difference (per prompt) | median | same token at a position |")
    print("|---|---|---:|---:|")
    for name, native in (("native decode layers (fp32 activations)", True), ("torch ops (bf16 activations)", False)):
        got = tokens(half, prompts, args.tokens, native)
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(ref, got)]
        same = sum(a == b for x, y in zip(ref, got) for a, b in zip(x, y)) / sum(map(len, ref))
        print(f"| {name} | {first} | {statistics.median(first):.0f} | {100 * same:.0f}% |")


if __name__ == "__main__":
    main()
