"""The adapter from vLLM's CPU paged cache to headwise's kernels, on random tensors.

The cache ``[P, Hkv, bs, 2*D]`` is written by ``paged.write`` from vLLM-style slot mappings into
shuffled blocks; the reference is ``sink_window.naive`` over each sequence's keys in order.
"""

from __future__ import annotations

import functools

import pytest
import torch

from headwise.integrations.vllm import paged
from headwise.kernels.sink_window import naive
from headwise.patches.runtime import LayerRule
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window

from .helpers import shuffled_tables

D, HKV, G, BS = 32, 3, 2, 32


def write_cache(keys: list[torch.Tensor], values: list[torch.Tensor], tables: torch.Tensor, num_blocks: int,
                dtype=torch.float32) -> torch.Tensor:
    """A ``[P, Hkv, bs, 2D]`` cache holding each sequence's ``[L, Hkv, D]`` keys/values at its blocks."""
    cache = torch.zeros(num_blocks, HKV, BS, 2 * D, dtype=dtype)
    for b, (k, v) in enumerate(zip(keys, values)):
        pos = torch.arange(k.shape[0])
        slots = tables[b, pos // BS].long() * BS + pos % BS
        pad = torch.full((3,), -1)                          # padding tokens: vLLM gives them slot -1
        paged.write(cache, torch.cat([k, torch.randn(3, HKV, D)]), torch.cat([v, torch.randn(3, HKV, D)]),
                    torch.cat([slots, pad]))
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pools_read_what_write_stored(dtype):
    torch.manual_seed(0)
    k, v = torch.randn(70, HKV, D), torch.randn(70, HKV, D)
    tables = torch.tensor([[5, 2, 7]])
    cache = write_cache([k], [v], tables, 8, dtype)
    k_pool, v_pool = paged.pools(cache)
    for p in (0, 31, 32, 69):
        for h in range(HKV):
            block = int(tables[0, p // BS]) * HKV + h
            assert torch.equal(k_pool[block, p % BS, 0], k[p, h].to(dtype))
            assert torch.equal(v_pool[block, p % BS, 0], v[p, h].to(dtype))


RULES = {
    "windows": [Window(sink=40, alpha=-8.0, beta=0.25), Window(sink=0, alpha=50.0, beta=0.0),
                Window(sink=64, alpha=0.0, beta=0.5)],
    "mixed": [Dense(), Window(sink=4, alpha=33.0, beta=0.0), Window(sink=64, alpha=-64.0, beta=0.25)],
    "same": [Window(sink=32, alpha=0.0, beta=0.125)] * 3,
    # span floors: the floor decides at short lengths, alpha + beta*N at long ones
    "floored": [Window(sink=40, alpha=-300.0, beta=0.5, min_span=50), Window(sink=4, alpha=-40.0, beta=0.125, min_span=20),
                Window(sink=0, alpha=-900.0, beta=1.0, min_span=70)],
}


#: decode paths: ``logical`` the native kernel over vLLM's table; ``tables`` per-head tables and positions
#: (the torch path, where the native kernel does not build), all rows in one call or one row per call
DECODE_PATHS = {"logical": ("auto", 0), "tables": ("cpu", 0), "tables-per-row": ("cpu", 1)}


@pytest.mark.parametrize("decode", list(DECODE_PATHS))
@pytest.mark.parametrize("prefill", ["plan", "dense"])
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_attend_matches_naive_over_decode_prefill_and_chunks(prefill, rule_name, decode, monkeypatch):
    """A mixed step: decodes at several lengths, a fresh prompt and a prompt chunk with context."""
    backend, gather_bytes = DECODE_PATHS[decode]
    monkeypatch.setattr(paged, "DECODE_GATHER_BYTES", gather_bytes)
    torch.manual_seed(1)
    rule = LayerRule.from_heads(tuple(RULES[rule_name]))
    prefill_rule = rule.as_dense() if prefill == "dense" else None   # a plan that prefills dense
    # (context before the step, new tokens this step)
    seqs = [(300, 1), (1, 1), (0, 90), (31, 1), (200, 57), (63, 1), (0, 1)]
    lengths = [c + q for c, q in seqs]
    tables, num_blocks = shuffled_tables(lengths, BS, spare=3)    # block 0: vLLM's null block
    keys = [torch.randn(n, HKV, D) for n in lengths]
    values = [torch.randn(n, HKV, D) for n in lengths]
    cache = write_cache(keys, values, tables, num_blocks)
    q_lens = [q for _, q in seqs]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    T = int(qsl[-1])
    query = torch.randn(T, HKV * G, D)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, seqs)])
    step = paged.StepLayout.build(qsl, torch.tensor(lengths, dtype=torch.int32), tables, BS, HKV)
    output = torch.full((T, HKV * G, D), float("nan"))
    scale = D ** -0.5
    paged.attend(query, new_k, new_v, cache, output, step, rule, scale, prefill_rule=prefill_rule, backend=backend)
    for b, (c, q) in enumerate(seqs):
        s, e = int(qsl[b]), int(qsl[b + 1])
        n = c + q
        used = rule.as_dense() if prefill == "dense" and q > 1 else rule     # decode tokens follow the plan
        span = used.span(torch.tensor([n]))
        ref = naive.sink_window_attention(query[s:e].transpose(0, 1)[None], keys[b].transpose(0, 1)[None],
                                          values[b].transpose(0, 1)[None], torch.arange(c, n)[None],
                                          torch.arange(n)[None, None], used.sink, span, scale)
        torch.testing.assert_close(output[s:e], ref[0].transpose(0, 1), atol=2e-5, rtol=1e-4)


def test_decode_tables_read_only_sink_and_window_blocks():
    # sequence of 1000 tokens (query at 999), sink 40 -> blocks 0,1; span 100 -> positions 900..999 -> blocks 28..31
    table = torch.arange(100, 132)[None]
    ids = paged.decode_tables(table, torch.tensor([1000]), 40, torch.tensor([100]), [2], BS, HKV)
    assert ids.tolist() == [[[b * HKV + 2 for b in (100, 101, 128, 129, 130, 131)]]]
    # a window reaching into the sink blocks never lists a block twice
    ids = paged.decode_tables(table, torch.tensor([70]), 40, torch.tensor([60]), [0], BS, HKV)
    assert ids.tolist() == [[[100 * HKV, 101 * HKV, 102 * HKV]]]
    # dense heads (span N) read every block
    ids = paged.decode_tables(table, torch.tensor([65]), 0, torch.tensor([65]), [1], BS, HKV)
    assert ids.tolist() == [[[100 * HKV + 1, 101 * HKV + 1, 102 * HKV + 1]]]


@pytest.mark.parametrize("stale", [False, True])
@pytest.mark.parametrize("prefill", ["plan", "dense"])
@pytest.mark.parametrize("rule_name", ["windows", "same", "floored"])
def test_attend_reads_nothing_from_blocks_the_kv_manager_gave_back(prefill, rule_name, stale):
    """Blocks ``kv_memory.LayerKeep.free_blocks`` frees become vLLM's null block (full of garbage):
    decodes and prompt chunks still equal the reference over every key. ``stale``: positions come
    from a ``PositionBuffer`` an earlier step filled for other sequences holding the same blocks."""
    from headwise.integrations.vllm.kv_memory import layer_keep

    torch.manual_seed(2)
    heads = tuple(RULES[rule_name])
    rule = LayerRule.from_heads(heads)
    dense_prefill = prefill == "dense"
    keep = layer_keep(heads, dense_prefill)
    # (context before the step, new tokens this step, prompt length): decodes after their prompt, and a
    # chunk that ends its prompt (a sparse-prefill plan frees during the prompt; a dense one does not)
    seqs = [(700, 1, 650), (400, 1, 64), (1000, 1, 1000), (500, 90, 590), (33, 1, 20)]
    lengths = [c + q for c, q, _ in seqs]
    tables, num_blocks = shuffled_tables(lengths, BS, spare=1)    # block 0: vLLM's null block
    keys = [torch.randn(n, HKV, D) for n in lengths]
    values = [torch.randn(n, HKV, D) for n in lengths]
    cache = write_cache(keys, values, tables, num_blocks)
    cache[paged.NULL_BLOCK] = 1e4 * torch.randn_like(cache[paged.NULL_BLOCK])     # stale data in the null block
    freed = 0
    for b, (c, _, prompt) in enumerate(seqs):
        first, last = keep.free_blocks(c, prompt, BS)
        tables[b, first:max(first, last)] = paged.NULL_BLOCK
        freed += max(0, last - first)
    assert freed >= 20, "the case frees too little to test anything"
    q_lens = [q for _, q, _ in seqs]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    T = int(qsl[-1])
    query = torch.randn(T, HKV * G, D)
    new_k = torch.cat([k[c:] for k, (c, _, _) in zip(keys, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _, _) in zip(values, seqs)])
    positions = None
    if stale:                                          # an earlier step: the blocks in other hands, other lengths
        positions = paged.PositionBuffer()
        earlier = torch.randint(1, num_blocks, tables.shape, dtype=torch.int32)
        positions.fill(earlier, torch.tensor([n - 45 for n in lengths]), BS, HKV, num_blocks * HKV)
    step = paged.StepLayout.build(qsl, torch.tensor(lengths, dtype=torch.int32), tables, BS, HKV, positions)
    output = torch.full((T, HKV * G, D), float("nan"))
    scale = D ** -0.5
    paged.attend(query, new_k, new_v, cache, output, step, rule, scale,
                 prefill_rule=rule.as_dense() if dense_prefill else None)
    for b, (c, q, _) in enumerate(seqs):
        s, e = int(qsl[b]), int(qsl[b + 1])
        n = c + q
        used = rule.as_dense() if dense_prefill and q > 1 else rule
        span = used.span(torch.tensor([n]))
        ref = naive.sink_window_attention(query[s:e].transpose(0, 1)[None], keys[b].transpose(0, 1)[None],
                                          values[b].transpose(0, 1)[None], torch.arange(c, n)[None],
                                          torch.arange(n)[None, None], used.sink, span, scale)
        torch.testing.assert_close(output[s:e], ref[0].transpose(0, 1), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("host", ["numpy", "torch"])
def test_position_buffer_across_steps_equals_a_fresh_fill(host, monkeypatch):
    """A ``PositionBuffer`` kept across decode steps, prefill chunks, freed blocks and blocks changing hands
    gives, for every block the step's tables hold, the rows a fresh buffer gives (it rewrites only the
    blocks whose positions changed); ``host``: the CPU's numpy fill or the torch one (other devices)."""
    if host == "torch":
        monkeypatch.setattr(paged, "NUMPY_FILL", False)
    torch.manual_seed(3)
    num_blocks, M = 64, 12
    kept = paged.PositionBuffer()
    lengths = torch.tensor([5, 40, 77])
    tables = (torch.randperm(num_blocks - 1)[:3 * M] + 1).reshape(3, M).int()
    for step in range(40):
        if step % 7 == 3:                 # a sequence ends; a new one gets free blocks, some of them used before
            others = set(tables[[b for b in range(3) if b != step % 3]].reshape(-1).tolist())
            free = [b for b in torch.randperm(num_blocks - 1).add(1).tolist() if b not in others]
            tables[step % 3] = torch.tensor(free[:M], dtype=torch.int32)
            lengths[step % 3] = int(torch.randint(1, M * BS - 20, ()))
        if step % 5 == 1:                                       # the KV manager gives a middle block back
            tables[step % 3, 1] = paged.NULL_BLOCK
        lengths = lengths + (torch.tensor([1, 1, 9]) if step % 4 else 1)   # decodes and a prefill chunk
        lengths = lengths.clamp(max=M * BS)
        pos = kept.fill(tables, lengths, BS, HKV, num_blocks * HKV)
        fresh = paged.PositionBuffer().fill(tables, lengths, BS, HKV, num_blocks * HKV)
        assert torch.equal(fresh, paged.PositionBuffer()._fill_torch(tables, lengths, BS, HKV, num_blocks * HKV))
        for b in range(3):
            for j in range(-(-int(lengths[b]) // BS)):
                block = int(tables[b, j])
                if block != paged.NULL_BLOCK:
                    rows = slice(block * HKV, (block + 1) * HKV)
                    assert torch.equal(pos[rows], fresh[rows]), (step, b, j)


@pytest.mark.parametrize("decode", ["logical", "tables"])
@pytest.mark.parametrize("prefill", ["plan", "dense"])
@pytest.mark.parametrize("rule_name", ["windows", "same", "floored"])
def test_freed_block_ids_left_in_the_worker_table_are_never_read(prefill, rule_name, decode):
    """vLLM nulls the blocks its KV manager frees only in the scheduler's block table: the worker's table
    keeps their ids while the pool hands them to other sequences in the same step. ``null_unread`` on the
    worker's table: every sequence, old holders and new ones, equals the reference over its own keys, with
    one ``PositionBuffer`` that an earlier step filled while the old holders had those blocks. (Without
    ``null_unread`` the old holders' stale entries overwrite the new holders' positions: the defect of the
    chunked vLLM test.) The step gets the worker's table as vLLM's metadata builder gives it, with
    ``null_unread`` applied where a reader needs it (``StepLayout.block_table``): the ``logical`` decode path
    reads the raw table (only sink and window entries), the ``tables`` path the nulled one."""
    from headwise.integrations.vllm.kv_memory import layer_keep

    torch.manual_seed(4)
    heads = tuple(RULES[rule_name])
    rule = LayerRule.from_heads(heads)
    dense_prefill = prefill == "dense"
    keep = layer_keep(heads, dense_prefill)
    # (context before the step, new tokens this step, prompt length); the old ones free blocks (decodes past
    # their prompts; a chunk inside its prompt frees under a sparse-prefill plan), the new ones get them
    old = [(700, 1, 650), (1000, 1, 1000), (500, 90, 700), (640, 1, 600)]
    new = [(0, 150, 150), (200, 60, 400), (599, 1, 600)]         # the last: a prompt's last token, alone in its chunk
    seqs = new + old                                             # batch rows: the new holders first
    lengths = [c + q for c, q, _ in seqs]
    need = [-(-n // BS) for n in lengths]
    spare = list(range(1, 200))                                  # block 0: vLLM's null block
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    freed = []
    for b, (c, _, prompt) in enumerate(seqs):
        if b >= len(new):
            tables[b, :need[b]] = torch.tensor([spare.pop(0) for _ in range(need[b])], dtype=torch.int32)
            first, last = keep.free_blocks(c, prompt, BS, max_chunk=256)
            freed += tables[b, first:max(first, last)].tolist()  # stay in the worker's table
    assert len(freed) >= (6 if dense_prefill else 12), "the case frees too little to test anything"
    pool = freed + spare                                          # freed blocks go out first
    for b in range(len(new)):
        tables[b, :need[b]] = torch.tensor([pool.pop(0) for _ in range(need[b])], dtype=torch.int32)
    num_blocks = 200
    keys = [torch.randn(n, HKV, D) for n in lengths]
    values = [torch.randn(n, HKV, D) for n in lengths]
    order = list(range(len(new), len(seqs))) + list(range(len(new)))   # the new holders write over freed blocks
    cache = write_cache([keys[b] for b in order], [values[b] for b in order], tables[order], num_blocks)
    positions = paged.PositionBuffer()                            # an earlier step: the old holders had them
    positions.fill(tables[len(new):], torch.tensor([c for c, _, _ in old]), BS, HKV, num_blocks * HKV)
    q_lens = [q for _, q, _ in seqs]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    prefilling = torch.tensor([c < prompt for c, _, prompt in seqs])
    unread = functools.partial(paged.null_unread, query_start_loc=qsl, seq_lens=seq_lens, prefilling=prefilling,
                               keep=keep, block_size=BS)                # as cpu.HeadwiseCPUMetadataBuilder.build
    T = int(qsl[-1])
    query = torch.randn(T, HKV * G, D)
    new_k = torch.cat([k[c:] for k, (c, _, _) in zip(keys, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _, _) in zip(values, seqs)])
    scale = D ** -0.5
    for repeat in range(2):                                       # two steps over the same tables
        step = paged.StepLayout.build(qsl, seq_lens, tables, BS, HKV, positions, prefilling, unread)
        output = torch.full((T, HKV * G, D), float("nan"))
        paged.attend(query, new_k, new_v, cache, output, step, rule, scale,
                     prefill_rule=rule.as_dense() if dense_prefill else None, backend=DECODE_PATHS[decode][0])
        for b, (c, q, prompt) in enumerate(seqs):
            s, e = int(qsl[b]), int(qsl[b + 1])
            n = c + q
            used = rule.as_dense() if dense_prefill and c < prompt else rule   # prompt tokens of a dense-prefill plan
            span = used.span(torch.tensor([n]))
            ref = naive.sink_window_attention(query[s:e].transpose(0, 1)[None], keys[b].transpose(0, 1)[None],
                                              values[b].transpose(0, 1)[None], torch.arange(c, n)[None],
                                              torch.arange(n)[None, None], used.sink, span, scale)
            torch.testing.assert_close(output[s:e], ref[0].transpose(0, 1), atol=2e-5, rtol=1e-4,
                                       msg=f"step {repeat}, sequence {b}")


def test_null_unread_nulls_what_kv_memory_says_no_query_reads():
    """The tensor rule of ``paged.null_unread`` equals ``LayerKeep.unread_blocks`` row by row."""
    import random

    from headwise.integrations.vllm.kv_memory import layer_keep

    rng = random.Random(5)
    for rule_name in sorted(RULES):
        heads = tuple(h for h in RULES[rule_name] if not h.kv_rule()[3])
        for dense_prefill in (False, True):
            keep = layer_keep(heads, dense_prefill)
            rows = [(rng.randint(0, 3000), rng.choice([1, 1, 7, 256]), rng.random() < 0.5) for _ in range(64)]
            q_lens = [q for _, q, _ in rows]
            qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
            seq_lens = torch.tensor([c + q for c, q, _ in rows])
            M = -(-int(seq_lens.max()) // BS)
            tables = torch.randint(1, 10_000, (len(rows) + 2, M), dtype=torch.int32)   # 2 padding rows
            got = paged.null_unread(tables, qsl, seq_lens, torch.tensor([p for _, _, p in rows]), keep, BS)
            assert got.dtype == tables.dtype and torch.equal(got[len(rows):], tables[len(rows):])
            for b, (c, q, pre) in enumerate(rows):
                first, last = keep.unread_blocks(c, c + q, pre, BS)
                want = tables[b].clone()
                want[first:max(first, last)] = paged.NULL_BLOCK
                assert torch.equal(got[b], want), (rule_name, dense_prefill, c, q, pre)


def test_layers_sharing_a_step_with_the_same_rule_on_other_heads():
    """Two layers of one KV cache group (one ``StepLayout``) whose heads have the same rules on different KV
    heads: each reads its own heads (the step's cached decode inputs are per rule and heads)."""
    torch.manual_seed(5)
    w = Window(sink=32, alpha=40.0, beta=0.0)
    rules = [LayerRule.from_heads((Dense(), w, w)), LayerRule.from_heads((w, w, Dense()))]
    seqs = [(300, 1), (90, 1), (0, 50)]
    lengths = [c + q for c, q in seqs]
    tables, num_blocks = shuffled_tables(lengths, BS, spare=2)
    keys = [torch.randn(n, HKV, D) for n in lengths]
    values = [torch.randn(n, HKV, D) for n in lengths]
    cache = write_cache(keys, values, tables, num_blocks)
    qsl = torch.tensor([0, 1, 2, 52], dtype=torch.int32)
    query = torch.randn(52, HKV * G, D)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, seqs)])
    shared = paged.StepLayout.build(qsl, torch.tensor(lengths), tables, BS, HKV)
    for rule in rules:
        got, want = torch.empty(52, HKV * G, D), torch.empty(52, HKV * G, D)
        paged.attend(query, new_k, new_v, cache, got, shared, rule, D ** -0.5)
        paged.attend(query, new_k, new_v, cache, want, paged.StepLayout.build(qsl, torch.tensor(lengths), tables, BS,
                                                                              HKV), rule, D ** -0.5)
        torch.testing.assert_close(got, want)
