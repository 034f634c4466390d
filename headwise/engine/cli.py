"""``headwise generate``: run prompts through the engine with a plan, print or save the outputs."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate with the paged-KV engine under a plan")
    p.add_argument("--model", default=None,
                   help="model name (headwise model list) or local checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--plan", default="dense", help="plan JSON, 'dense' or 'uniform:0.25' (default: dense)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="text file, one prompt per line, or JSONL with 'prompt' or "
                                         "'prompt_token_ids' per line")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--kv-cache-memory", default="2GiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prefill", choices=["sparse", "dense"], default=None, help="override the plan's prefill mode")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", help="write JSONL results here instead of printing text")
    p.set_defaults(func=_generate)


def read_prompts(path: str) -> list:
    """Prompts from a file: JSONL objects (``prompt`` or ``prompt_token_ids``) or plain text lines."""
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path} line {n} is not valid JSON ({e.msg}); write one object per line.")
                prompts.append(item if "prompt_token_ids" in item else item.get("prompt", ""))
            else:
                prompts.append(line.rstrip("\n"))
    return prompts


def _generate(args) -> int:
    import torch

    from . import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = list(args.prompt) + (read_prompts(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise SystemExit("give prompts with --prompt TEXT or --prompt-file FILE.")
    llm = LLM(args.model, plan=args.plan, kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, dtype=args.dtype, prefill=args.prefill)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    outputs = llm.generate(prompts, params)
    out = open(args.out, "w") if args.out else None
    for o in outputs:
        c = o.outputs[0]
        record = {"request": o.request_id, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                  "error": o.error, "kv": o.kv}
        if out:
            out.write(json.dumps(record) + "\n")
        elif o.error:
            print(f"[{o.request_id}] error: {o.error}")
        else:
            print(f"[{o.request_id}] ({c.finish_reason}) {c.text}")
    s = llm.last_stats
    print(f"prefill {s.prefill_tokens} tokens in {s.prefill_seconds:.2f} s; decode {s.decode_tokens} tokens at "
          f"{s.decode_tokens_per_second:.1f} tok/s; KV held at peak {s.peak_kv_bytes / 2**20:.1f} MiB "
          f"(a dense cache: {s.dense_kv_bytes / 2**20:.1f} MiB); preemptions {s.preemptions}", file=sys.stderr)
    if out:
        out.close()
    return int(any(o.error for o in outputs))
