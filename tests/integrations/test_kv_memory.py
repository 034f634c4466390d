"""Which KV blocks the vLLM plugin gives back for all-window layers (``kv_memory``), without vLLM.

The property: no query still to come reads a key in a freed block, whatever the chunking, for
random rules, prompt lengths and progress; and the freeing is not empty where it should not be.
"""

from __future__ import annotations

import random

import pytest

from headwise.integrations.vllm.kv_memory import LayerKeep, layer_keep
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window


def random_heads(rng: random.Random) -> tuple:
    heads = []
    for _ in range(rng.randint(1, 3)):
        beta = rng.choice([0.0, 0.0, 0.125, 0.5, 1.0, rng.random()])
        heads.append(Window(sink=rng.choice([0, 4, 64, 100]), alpha=rng.choice([-64.0, 0.0, 33.0, 96.0, 600.0, -900.0]),
                            beta=beta, min_span=rng.choice([0, 0, 40, 200])))
    return tuple(heads)


def earliest_window_key(heads, q: int, n: int) -> int:
    """The first position a query at ``q`` of a step ending at length ``n`` reads past the sinks."""
    return min(max(0, q + 1 - h.span(n)) for h in heads)     # the spec's rule, span floor included


@pytest.mark.parametrize("prefill_dense", [False, True])
def test_no_query_still_to_come_reads_a_freed_block(prefill_dense):
    rng = random.Random(7 if prefill_dense else 8)
    checked = freed_cases = 0
    for _ in range(400):
        heads = random_heads(rng)
        keep = layer_keep(heads, prefill_dense)
        bs = rng.choice([16, 32, 128])
        prompt = rng.randint(1, 1500)
        processed = rng.randint(0, prompt + 600)
        first, last = keep.free_blocks(processed, prompt, bs)
        if first >= last:
            continue
        freed_cases += 1
        assert max(h.sink for h in heads) <= first * bs, "a sink token sits in a freed block"
        # decode tokens: one query at q, the step ends at q + 1
        for q in range(max(processed, prompt), max(processed, prompt) + 300):
            assert earliest_window_key(heads, q, q + 1) >= last * bs
            checked += 1
        # prompt tokens still to come: a chunk ending anywhere up to the prompt's end
        for q in range(processed, prompt):
            assert not prefill_dense, "a dense-prefill plan freed a block before its prompt was in"
            for n in {q + 1, prompt, (q + 1 + prompt) // 2}:
                assert earliest_window_key(heads, q, n) >= last * bs
                checked += 1
    assert freed_cases > 100 and checked > 10000


def test_fixed_windows_free_everything_between_sink_and_window():
    keep = layer_keep((Window(sink=64, alpha=96.0, beta=0.0), Window(sink=4, alpha=256.0, beta=0.0)), True)
    assert keep == LayerKeep(64, ((96.0, 0.0), (256.0, 0.0)), True)
    # 8000 tokens processed, prompt 7000: next query 8000 reads 7745..8000 -> block 60 (7680..7807) onwards
    assert keep.free_blocks(8000, 7000, 128) == (1, 60)
    # a dense-prefill prompt is held whole until it is in
    assert keep.free_blocks(6999, 7000, 128)[1] == 0
    sparse = LayerKeep(64, ((96.0, 0.0),), False)
    assert sparse.free_blocks(6999, 7000, 128) == (1, 53)         # 7000 - 96 = 6904 -> block 53


def test_elastic_spans_keep_what_the_longest_chunk_reads():
    keep = LayerKeep(0, ((0.0, 0.5),), False)
    # 1000 processed of a 4000-token prompt: a chunk may end at 4000, span 2000: keep from 1001 - 2000 < 0
    assert keep.first_kept(1000, 4000) == 0
    # past the prompt: N* = p + 1 = 6001, span 3000
    assert keep.first_kept(6000, 4000) == 6001 - 3000


def test_a_dense_head_keeps_the_whole_layer():
    assert layer_keep((Dense(), Window(sink=4, alpha=8.0, beta=0.0)), True) is None
    assert layer_keep((), True) is None


def test_union_takes_the_larger_sink_and_every_window():
    a, b = LayerKeep(4, ((8.0, 0.0),), True), LayerKeep(64, ((0.0, 0.25), (8.0, 0.0)), True)
    assert a.union(b) == LayerKeep(64, ((0.0, 0.25), (8.0, 0.0)), True)
    assert a.union(b).span(1000) == 250
    with pytest.raises(ValueError):
        a.union(LayerKeep(4, ((8.0, 0.0),), False))


@pytest.mark.parametrize("prefill_dense", [False, True])
def test_every_freed_block_is_one_the_attention_nulls_and_none_it_reads(prefill_dense):
    """vLLM's worker keeps the ids of freed blocks in its block table, so the attention nulls, each step, the
    blocks ``unread_blocks`` names. For every step after a freeing (any later context, any chunk up to the
    token budget, a chunk past the prompt too: a preempted request recomputed), that range holds every freed
    block; and for ordinary steps (a prompt chunk inside the prompt, a decode) no query of the step reads a
    key in it."""
    rng = random.Random(11 if prefill_dense else 12)
    freed_cases = steps = 0
    for _ in range(300):
        heads = random_heads(rng)
        keep = layer_keep(heads, prefill_dense)
        bs = rng.choice([16, 32, 128])
        budget = rng.choice([1, 16, 256, 2048])
        prompt = rng.randint(1, 1500)
        processed = rng.randint(0, prompt + 600)
        first, last = keep.free_blocks(processed, prompt, bs, budget)
        if first < last:
            freed_cases += 1
        for _ in range(30):
            context = processed + rng.choice([0, 0, 1, rng.randint(0, 700)])
            chunk = rng.randint(1, budget)
            prefilling = context < prompt
            u_first, u_last = keep.unread_blocks(context, context + chunk, prefilling, bs)
            if first < last:
                assert u_first == first and last <= u_last, (processed, prompt, context, chunk)
            steps += 1
            ordinary = context + chunk <= prompt if prefilling else chunk == 1
            if ordinary and u_first < u_last:
                n = context + chunk
                dense = prefilling and prefill_dense
                reads = 0 if dense else min(earliest_window_key(heads, q, n) for q in range(context, n))
                assert reads >= u_last * bs, (context, chunk, prefilling)
    assert freed_cases > 80 and steps > 5000


def test_a_prompt_chunk_may_end_past_the_prompt_only_on_recompute_so_freeing_keeps_a_budget_more():
    keep = LayerKeep(0, ((0.0, 0.5),), False)
    # 1000 of a 1100-token prompt in, budget 512: a (recomputed) chunk from 1000 may end at 1512, span 756
    assert keep.first_kept(1000, 1100, max_chunk=512) == 1001 - 756
    assert keep.first_kept(1000, 1100) == 1001 - 550            # budget 1: chunks end inside the prompt
    # past the prompt: the budget does not matter (decode windows)
    assert keep.first_kept(6000, 4000, max_chunk=512) == 6001 - 3000
