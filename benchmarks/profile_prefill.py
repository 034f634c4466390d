"""Where an engine prefill goes: ``torch.profiler`` over one prompt's prefill, ops grouped into parts.

    python benchmarks/profile_prefill.py [--plan smollm2-135m-d25] [--length 8192] [--dtype float32]

Runs a short warm-up prompt (native builds, vLLM's import, first-call costs), then profiles one
``LLM.generate`` of a prose prompt of ``--length`` tokens with ``max_tokens=1`` (the prefill and its
first token), and prints each part's self CPU seconds and share, then the top ops. Self CPU time
sums both threads' work on an op, so read the shares, not the seconds, against wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/profile_prefill.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import SHIPPED_D25, Setting, make_prompts, provenance, provenance_line  # noqa: E402

#: Part of each profiled op (first matching fragment of its name wins); anything else is "other".
PARTS = [
    ("linears (GEMM)", ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "_C::onednn_mm")),
    ("attention kernel", ("cpu_attention_with_kv_cache", "cpu_attn_reshape_and_cache", "flash_attention",
                          "aten::_scaled_dot_product")),
    ("elementwise (norms, RoPE, SiLU gate, residual adds, log-sum-exp merges)",
     ("aten::mul", "aten::add", "aten::cat", "aten::neg", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu",
      "aten::sum", "aten::softmax", "aten::_softmax", "aten::sub", "aten::exp", "aten::div")),
    ("copies (contiguous, dtype casts)", ("aten::copy_", "aten::clone", "aten::_to_copy")),
    ("KV writes and gathers, fills", ("aten::index_copy", "aten::index_put", "aten::index", "aten::index_select",
                                      "aten::fill_", "aten::zero_", "aten::gather", "aten::scatter")),
    ("embedding", ("aten::embedding",)),
]


def part_of(name: str) -> str:
    return next((part for part, fragments in PARTS if any(f in name for f in fragments)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=SHIPPED_D25)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top", type=int, default=15, help="ops listed after the parts table")
    args = parser.parse_args()

    from headwise.engine import LLM, SamplingParams
    from headwise.models import load_model

    torch.set_num_threads(args.threads)
    print(provenance_line(provenance()))
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(dtype=dtype)
    prompt = make_prompts(Setting(args.length, 1), tokenizer)[0][: args.length - 8]
    llm = LLM(model=model, plan=args.plan, kv_cache_memory="2GiB", dtype=dtype)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt[:512]}], params, use_tqdm=False)          # warm-up
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    wall = time.perf_counter() - start

    parts: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        parts[part_of(event.key)] += seconds
        ops.append((seconds, event.key, event.count))
    total = sum(parts.values())
    print(f"\nengine prefill of 1 x {len(prompt)} tokens, {args.plan}, {args.dtype}, {args.threads} threads: "
          f"{wall:.1f} s wall under the profiler, {total:.1f} s self CPU\n")
    print("| part | self CPU s | share |\n|---|---:|---:|")
    for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    print(f"\n| top op | calls | self CPU s | share |\n|---|---:|---:|---:|")
    for seconds, name, count in sorted(ops, reverse=True)[: args.top]:
        print(f"| `{name}` | {count} | {seconds:.2f} | {100 * seconds / total:.0f}% |")


if __name__ == "__main__":
    main()
