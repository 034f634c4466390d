"""Run ``vllm.LLM`` greedy generation in its own process: ``python vllm_run.py request.json result.json``.

vLLM spawns its engine process, which needs a ``__main__`` guard, so tests run it through this
script instead of in-process. ``request.json``:
``{"model": dir, "plan": spec or null, "prompts": [[token ids], ...], "max_tokens": n,
   "llm": {extra LLM(...) keyword arguments}}``.
``result.json``: ``{"tokens": [[ids], ...], "num_gpu_blocks": int}``.
"""

from __future__ import annotations

import json
import sys


def main(request_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(request_path) as f:
        req = json.load(f)
    kwargs = dict(model=req["model"], dtype="float32", enforce_eager=True, enable_prefix_caching=False,
                  max_model_len=req.get("max_model_len", 4096), seed=0)
    kwargs.update(req.get("llm") or {})
    if req.get("plan") is not None:
        kwargs["additional_config"] = {"headwise_plan": req["plan"]}
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in req["prompts"]], params, use_tqdm=False)
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    with open(result_path, "w") as f:
        json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs], "num_gpu_blocks": blocks}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
