"""Reading vLLM's KV block pool from a ``vllm.LLM`` whose engine core runs in-process.

For benchmarks and tests: with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core (scheduler, KV
cache manager, block pool) lives in the caller's process, so blocks in use can be counted after each
``llm.llm_engine.step()`` (DESIGN §12). No vLLM import at module level.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolLayout:
    """What vLLM allocated: ``num_blocks`` blocks of ``bytes_per_block`` bytes, in ``groups``.

    ``groups`` lists ``(number of layers, spec class name, block size in tokens)`` per KV cache group;
    one block id holds one page of every layer of the group that owns it.
    """

    num_blocks: int
    bytes_per_block: int
    groups: tuple[tuple[int, str, int], ...]

    @property
    def usable_blocks(self) -> int:
        """Blocks a request can get (the pool keeps block 0 as its null block)."""
        return self.num_blocks - 1


def scheduler(llm):
    """The in-process engine core's scheduler of ``llm`` (a ``vllm.LLM``).

    Raises:
        RuntimeError: one sentence when the engine core runs in another process.
    """
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None or not hasattr(core, "scheduler"):
        raise RuntimeError("vLLM's engine core runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                           "before creating the LLM to read its KV block pool.")
    return core.scheduler


def pool_layout(llm) -> PoolLayout:
    """The KV pool vLLM allocated for ``llm``."""
    sched = scheduler(llm)
    config = sched.kv_cache_config
    pool = sched.kv_cache_manager.block_pool
    size = max(t.size for t in config.kv_cache_tensors)          # every group's tensors alias one allocation
    groups = tuple((len(g.layer_names), type(g.kv_cache_spec).__name__, g.kv_cache_spec.block_size)
                   for g in config.kv_cache_groups)
    return PoolLayout(pool.num_gpu_blocks, size // config.num_blocks, groups)


def blocks_in_use(llm) -> int:
    """Blocks held by requests now (free and cached-but-evictable blocks do not count)."""
    pool = scheduler(llm).kv_cache_manager.block_pool
    return pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
