"""Run ``vllm.LLM`` greedy generation in its own process: ``python vllm_run.py request.json result.json``.

vLLM spawns its engine process, which needs a ``__main__`` guard, so tests run it through this
script instead of in-process. ``request.json``:
``{"model": dir, "plan": spec or null, "prompts": [[token ids], ...], "max_tokens": n,
   "llm": {extra LLM(...) keyword arguments}, "measure": bool}``.
``result.json``: ``{"tokens": [[ids], ...], "num_gpu_blocks": int}``; with ``"measure": true`` the
engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), the requests are stepped by
hand and the result adds ``"used": [blocks in use after each step]``, ``"first_tokens_step"`` (the
step after which every request had its first token), ``"cached": [prefix-cache hit tokens per
request]``, ``"bytes_per_block"`` and ``"groups"`` (``headwise.integrations.vllm.pool``). A request
may also give ``"then": [[token ids], ...]``: prompts run after the first ones finish (their tokens
and cached counts follow the first prompts' in the result).
"""

from __future__ import annotations

import json
import os
import sys


def main(request_path: str, result_path: str) -> None:
    with open(request_path) as f:
        req = json.load(f)
    if req.get("measure"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    kwargs = dict(model=req["model"], dtype="float32", enforce_eager=True, enable_prefix_caching=False,
                  max_model_len=req.get("max_model_len", 4096), seed=0)
    kwargs.update(req.get("llm") or {})
    if req.get("plan") is not None:
        kwargs["additional_config"] = {**kwargs.get("additional_config", {}), "headwise_plan": req["plan"]}
    llm = LLM(**kwargs)
    params = SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, ignore_eos=True)
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    result = {"num_gpu_blocks": blocks}
    if req.get("measure"):
        from headwise.integrations.vllm.pool import blocks_in_use, pool_layout

        engine = llm.llm_engine
        tokens, cached, used, first_tokens_step = {}, {}, [], None
        rounds = [req["prompts"]] + ([req["then"]] if req.get("then") else [])
        ids_of = []
        for prompts in rounds:
            for ids in prompts:
                ids_of.append(str(len(ids_of)))
                engine.add_request(ids_of[-1], {"prompt_token_ids": ids}, params)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
                    cached[out.request_id] = out.num_cached_tokens
                used.append(blocks_in_use(llm))
                if first_tokens_step is None and len(tokens) == len(req["prompts"]) and all(tokens.values()):
                    first_tokens_step = len(used) - 1
        layout = pool_layout(llm)
        result.update(tokens=[tokens[i] for i in ids_of], cached=[cached[i] for i in ids_of], used=used,
                      first_tokens_step=first_tokens_step, bytes_per_block=layout.bytes_per_block,
                      groups=layout.groups)
    else:
        outs = llm.generate([{"prompt_token_ids": ids} for ids in req["prompts"]], params, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
