"""How vLLM 0.32 groups the KV cache of a plan, and the bytes a request then holds: no model run.

The specs are those the CPU plugin reports (``headwise.integrations.vllm.split.plan_specs``: a
``SinkWindowSpec`` per all-window layer, ``FullAttentionSpec`` otherwise; with ``--split`` a layer's
dense KV heads become a part layer of their own). vLLM's own ``get_kv_cache_groups`` groups them
(hybrid KV cache manager on, the CPU backend's layer-outer ``LBHNC`` layout), so the numbers follow
its rules: one block id is one page of every layer of the group that owns it; every group's block
has the bytes of the widest group (``kv_cache_utils._get_kv_cache_bytes_per_block``), groups of one
bucket are padded to the same number of layers.

For a request of ``--prompt`` tokens decoding to ``--length`` tokens, per plan, split and group
policy: KV cache groups, bytes per block, blocks and bytes held once the prompt is in and decoding
(a dense-prefill plan holds its whole prompt until the prompt is in), against vLLM dense::

    python benchmarks/vllm_kv_groups.py --prompt 8144 --length 8177
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def held_blocks(groups, prompt: int, length: int, at_prompt_end: bool) -> int:
    """Blocks one request holds over all groups: at its prompt's end, or decoding at ``length``."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    from headwise.integrations.vllm.kv_spec import SinkWindowSpec

    total = 0
    for g in groups:
        spec = g.kv_cache_spec
        if isinstance(spec, UniformTypeKVCacheSpecs):
            spec = spec.first_spec
        n = prompt if at_prompt_end else length
        blocks = math.ceil(n / spec.block_size)
        if isinstance(spec, SinkWindowSpec):
            first, last = spec.keep.free_blocks(n - 1, prompt, spec.block_size)
            blocks -= max(0, last - first)
        total += blocks
    return total


def cpu_kv_cache_groups(specs: dict):
    """vLLM's ``get_kv_cache_groups`` for ``specs`` (layer name -> spec) under the CPU backend's layout."""
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups

    config = VllmConfig()
    config.cache_config.kv_cache_layout = "LBHNC"            # what the CPU backend supports
    return get_kv_cache_groups(config, dict(specs))


def dense_specs(plan, block_size: int, dtype) -> dict:
    """vLLM's own full-attention spec for every layer of ``plan``'s model (vLLM without a plan)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(
        block_size=block_size, num_kv_heads=plan.model.num_kv_heads, head_size=plan.model.head_dim, dtype=dtype)
        for i in range(len(plan.layers))}


def bytes_per_block(groups) -> int:
    """The widest group's bytes per block (vLLM's pool block under a layer-outer layout)."""
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    def page(g, name):
        spec = g.kv_cache_spec
        return (spec.kv_cache_specs[name] if isinstance(spec, UniformTypeKVCacheSpecs) else spec).page_size_bytes

    return max(sum(page(g, name) for name in g.layer_names) for g in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plans", default="smollm2-135m-d25,smollm2-135m-d50,uniform:0.25")
    parser.add_argument("--prompt", type=int, default=8144)
    parser.add_argument("--length", type=int, default=8177, help="tokens when measured (prompt + generated)")
    parser.add_argument("--block-size", type=int, default=128, help="vLLM's block size (CPU default 128)")
    parser.add_argument("--max-len", type=int, default=8192, help="vLLM's max_model_len")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    import logging

    import torch
    from transformers import AutoConfig

    from headwise.integrations.vllm.kv_spec import GROUP_POLICIES, register_kv_spec
    from headwise.integrations.vllm.split import plan_specs
    from headwise.models import embedded_model_dir
    from headwise.plan import Plan

    logging.getLogger("vllm").setLevel(logging.ERROR)
    register_kv_spec()
    hf = AutoConfig.from_pretrained(embedded_model_dir(), local_files_only=True)
    dtype = getattr(torch, args.dtype)
    dense_plan = Plan.dense(hf)
    dense_groups = cpu_kv_cache_groups(dense_specs(dense_plan, args.block_size, dtype))
    dense_bytes = held_blocks(dense_groups, args.prompt, args.length, False) * bytes_per_block(dense_groups)
    print(f"vLLM 0.32 KV cache grouping, {Path(str(embedded_model_dir())).name}, {args.dtype}, block size "
          f"{args.block_size}, max_model_len {args.max_len}; one request: prompt {args.prompt}, decoding at "
          f"{args.length} tokens; vLLM dense holds {dense_bytes / 2**20:.1f} MB")
    print("| plan | split mixed layers | group policy | KV groups (padded layer slots) | block MB | "
          "MB held once decoding | vs dense | MB held at the prompt's end | vs dense |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.plans.split(","):
        plan = Plan.from_spec(spec, hf)
        for split in (False, True):
            for policy in GROUP_POLICIES:
                specs = plan_specs(plan, args.block_size, dtype, args.max_len, split, policy)
                groups = cpu_kv_cache_groups(specs)
                bpb = bytes_per_block(groups)
                width = max(len(g.layer_names) for g in groups)
                padded = width * len(groups) - len(specs)
                decoding = held_blocks(groups, args.prompt, args.length, False) * bpb
                prompt_end = held_blocks(groups, args.prompt, args.length, True) * bpb
                label = Path(spec).stem if spec.endswith(".json") else spec
                print(f"| {label} | {'yes' if split else 'no'} | {policy} | {len(groups)} ({padded}) | "
                      f"{bpb / 2**20:.2f} | {decoding / 2**20:.1f} | {decoding / dense_bytes:.0%} | "
                      f"{prompt_end / 2**20:.1f} | {prompt_end / dense_bytes:.0%} |")


if __name__ == "__main__":
    main()
