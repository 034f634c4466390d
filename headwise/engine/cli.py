"""``headwise generate``: run prompts through the engine with a plan, print or save the outputs.

Sampling defaults are ``SamplingParams``' own (vLLM's), so the command and the API agree.
"""

from __future__ import annotations

import dataclasses
import json
import sys


def _sampling_defaults() -> dict:
    from .sampling import SamplingParams

    return {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.default is not dataclasses.MISSING}


def register(subparsers) -> None:
    d = _sampling_defaults()
    p = subparsers.add_parser("generate", help="generate with the paged-KV engine under a plan",
                              description="Generate with the paged-KV engine under a plan. Sampling options "
                                          "are vLLM's SamplingParams fields, with the same defaults.")
    p.add_argument("--model", default=None,
                   help="model name (headwise model list) or local checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--plan", default="dense", help="plan JSON, 'dense' or 'uniform:0.25'")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="text file, one prompt per line, or JSONL with 'prompt', "
                                         "'prompt_token_ids' or 'messages' (a chat) per line")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    p.add_argument("--stream", action="store_true", help="print the text as it is made (one prompt only)")
    p.add_argument("--max-tokens", type=int, default=d["max_tokens"], help="most new tokens per prompt")
    p.add_argument("--min-tokens", type=int, default=d["min_tokens"],
                   help="new tokens before end-of-sequence or a stop may end a prompt")
    p.add_argument("--temperature", type=float, default=d["temperature"], help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=d["top_k"], help="-1 = off")
    p.add_argument("--min-p", type=float, default=d["min_p"], help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=d["repetition_penalty"], help="1 = off")
    p.add_argument("--presence-penalty", type=float, default=d["presence_penalty"], help="0 = off")
    p.add_argument("--frequency-penalty", type=float, default=d["frequency_penalty"], help="0 = off")
    p.add_argument("--seed", type=int, default=d["seed"], help="sampling seed (default: none, a new draw each run)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=None, dest="stop_token_ids",
                   help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--kv-cache-memory", default="2GiB", help="KV pool size")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=16, help="most requests in flight")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV dtype")
    p.add_argument("--prefill", choices=["sparse", "dense"], default=None,
                   help="override the plan's prefill mode (default: the plan's)")
    p.add_argument("--backend", default="auto", help="attention kernel backend: auto, cpu, naive, native, triton")
    p.add_argument("--out", help="write JSONL results here instead of printing text")
    from ..cli import add_threads

    add_threads(p)
    p.set_defaults(func=_generate)


def read_prompts(path: str) -> list:
    """Prompts from a file: JSONL objects (``prompt``, ``prompt_token_ids`` or ``messages``) or plain text lines."""
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
                if "prompt_token_ids" in item or "messages" in item:
                    prompts.append(item)
                elif "prompt" in item:
                    prompts.append(item["prompt"])
                else:
                    raise SystemExit(f"{path} line {n} has none of 'prompt', 'prompt_token_ids', 'messages'; "
                                     "give one of them.")
            else:
                prompts.append(line.rstrip("\n"))
    return prompts


def _as_chat(prompt, system: str | None):
    if not isinstance(prompt, str):
        return prompt
    return {"messages": ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": prompt}]}


def _generate(args) -> int:
    from . import LLM, SamplingParams

    prompts = list(args.prompt) + (read_prompts(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise SystemExit("give prompts with --prompt TEXT or --prompt-file FILE.")
    if args.system is not None and not args.chat:
        raise SystemExit("--system needs --chat.")
    if args.stream and len(prompts) != 1:
        raise SystemExit(f"--stream prints one prompt's text as it is made; got {len(prompts)} prompts.")
    if args.chat:
        prompts = [_as_chat(prompt, args.system) for prompt in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                            stop_token_ids=args.stop_token_ids or [], ignore_eos=args.ignore_eos,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty)
    params.check()                                           # one bad option stops the command, not each prompt
    llm = LLM(args.model, plan=args.plan, kv_cache_memory=args.kv_cache_memory, block_size=args.block_size,
              max_num_seqs=args.max_num_seqs, dtype=args.dtype, prefill=args.prefill, backend=args.backend)
    if args.stream:
        outputs = _stream(llm, prompts[0], params)
    else:
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
        elif not args.stream:
            print(f"[{o.request_id}] ({c.finish_reason}) {c.text}")
    s = llm.last_stats
    print(f"prefill {s.prefill_tokens} tokens in {s.prefill_seconds:.2f} s; decode {s.decode_tokens} tokens at "
          f"{s.decode_tokens_per_second:.1f} tok/s; KV at peak in whole {llm.config.block_size}-token blocks: held "
          f"{s.peak_kv_bytes / 2**20:.2f} MiB, a dense cache {s.dense_kv_bytes / 2**20:.2f} MiB; "
          f"preemptions {s.preemptions}", file=sys.stderr)
    if out:
        out.close()
    return int(any(o.error for o in outputs))


def _stream(llm, prompt, params) -> list:
    """Print one prompt's text delta by delta; returns its output as ``generate`` would."""
    outputs = []
    for event in llm.stream([prompt], params):
        print(event.delta, end="", flush=True)
        if event.output is not None:
            outputs.append(event.output)
    print(flush=True)
    return outputs
