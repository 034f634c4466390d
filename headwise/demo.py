"""``headwise demo``: passkey retrieval on the embedded model, dense vs plans, as a table.

For each plan and context length it reports accuracy over needle depths, KV bytes really kept
after the prefill, prefill time and time per decode step (greedy, cached).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHIPPED_PLANS = Path(__file__).resolve().parent.parent / "plans"


@dataclass
class PasskeyRun:
    """Results of one plan at one length."""

    plan: str
    length: int
    correct: int
    trials: int
    kept_mb: float
    dense_mb: float
    prefill_s: float
    decode_ms: float


@torch.no_grad()
def greedy_passkey(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, dict, float, float]:
    """Prefill ``prompt`` then decode greedily with the cache.

    Returns ``(text, kv_bytes_after_prefill, prefill_seconds, seconds_per_decode_step)``.
    """
    from . import expected_length, kv_bytes
    from .patches import is_patched

    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    target = ids.shape[1] + max_new_tokens
    ctx = expected_length(model, target) if is_patched(model) else contextlib.nullcontext()
    with ctx:
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - t0
        cache = out.past_key_values
        kept = kv_bytes(cache)
        token = out.logits[:, -1:].argmax(-1)
        generated = [token]
        t0 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            generated.append(token)
            if int(token) == tokenizer.eos_token_id:
                break
        decode = (time.perf_counter() - t0) / max(1, len(generated) - 1)
    text = tokenizer.decode(torch.cat(generated, dim=1)[0], skip_special_tokens=True)
    return text, kept, prefill, decode


def run_passkey(model, tokenizer, plans: dict[str, object], lengths: list[int], depths: list[float],
                max_new_tokens: int = 16, seed: int = 0) -> list[PasskeyRun]:
    """Passkey accuracy and cost of each plan (``name -> Plan | spec``) at each length."""
    from tqdm import tqdm

    from . import patch_model, unpatch_model
    from .eval.passkey import passkey_samples

    samples = {n: passkey_samples(tokenizer, n, depths, seed=seed + n) for n in lengths}
    runs = []
    bar = tqdm(total=len(plans) * len(lengths) * len(depths), desc="passkey", unit="prompt")
    for name, plan in plans.items():
        patch_model(model, plan)
        try:
            for n in lengths:
                correct, kept, prefill, decode = 0, [], [], []
                for sample in samples[n]:
                    bar.set_postfix_str(f"{name} {n // 1024}k depth {sample.depth:.2f}")
                    text, kv, t_pre, t_dec = greedy_passkey(model, tokenizer, sample.prompt, max_new_tokens)
                    correct += sample.answer in text
                    kept.append(kv["kept"])
                    prefill.append(t_pre)
                    decode.append(t_dec)
                    bar.update()
                dense_bytes = _dense_kv_bytes(model, statistics.mean(s.num_tokens for s in samples[n]))
                runs.append(PasskeyRun(name, n, correct, len(samples[n]), statistics.mean(kept) / 2**20,
                                       dense_bytes / 2**20, statistics.median(prefill),
                                       1000 * statistics.median(decode)))
        finally:
            unpatch_model(model)
    bar.close()
    return runs


def _dense_kv_bytes(model, tokens: float) -> float:
    from .plan import ModelInfo

    info = ModelInfo.of(model)
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * tokens * model.dtype.itemsize


def format_table(runs: list[PasskeyRun]) -> str:
    """Markdown table of passkey runs."""
    lines = ["| plan | context | passkey | kept KV MB (of dense) | prefill s | decode ms/step |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r.plan} | {r.length} | {r.correct}/{r.trials} | {r.kept_mb:.1f} "
                     f"({100 * r.kept_mb / r.dense_mb:.0f}%) | {r.prefill_s:.2f} | {r.decode_ms:.1f} |")
    return "\n".join(lines)


def default_plans(extra: list[str]) -> dict[str, object]:
    plans: dict[str, object] = {"dense": "dense", "uniform 25%": "uniform:0.25"}
    shipped = SHIPPED_PLANS / "smollm2-135m-d25.json"
    if shipped.is_file():
        plans["calibrated 25%"] = str(shipped)
    for path in extra:
        plans[Path(path).stem] = path
    return plans


def demo(args) -> int:
    from . import load_model

    torch.manual_seed(0)
    print("loading the embedded model (the first run converts it from GGUF, ~35 s)...", flush=True)
    model, tokenizer = load_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [(i + 0.5) / args.depths for i in range(args.depths)]
    runs = run_passkey(model, tokenizer, default_plans(args.plan), lengths, depths, args.max_new_tokens)
    print()
    print(f"Passkey retrieval, SmolLM2-135M-Instruct, {args.depths} needle depths per length, greedy, "
          f"{torch.get_num_threads()} CPU threads")
    print(format_table(runs))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="passkey retrieval on the embedded model: dense vs plans")
    p.add_argument("--plan", action="append", default=[], help="plan JSON to compare too (repeatable)")
    p.add_argument("--lengths", default="2048,4096,8192", help="context lengths in tokens, comma separated")
    p.add_argument("--depths", type=int, default=3, help="needle depths (trials) per length")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=demo)
