"""The adapter from vLLM's CUDA paged cache (Triton / FlashAttention layout) to headwise's kernels, on CPU.

The cache is ``[P, Hkv, bs, 2*D]`` in logical order with the physical orders vLLM may use (blocks
outermost, heads outermost, slots before heads), written as vLLM's ``reshape_and_cache_flash``
does (key at ``[..., :D]``, value at ``[..., D:]`` of slot ``block * bs + offset``) into shuffled
blocks. The reference is ``sink_window.naive`` over each sequence's keys in order. Every kernel
backend runs; ``triton`` under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

from headwise.integrations.vllm import paged_flash
from headwise.kernels.sink_window import naive
from headwise.kinds.kv_rule import LayerRule
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.grids import grid
from tests.kernels.cases import triton_marks

from .helpers import shuffled_tables

pytestmark = pytest.mark.usefixtures("all_threads")      # "auto" runs the native paged_decode kernel's OpenMP loop

D, HKV, G, BS = 32, 3, 2, 16

# physical order of the logical [P, Hkv, bs, 2D] dims, outermost first
LAYOUTS = {"blocks-heads-slots": (0, 1, 2, 3), "blocks-slots-heads": (0, 2, 1, 3), "heads-blocks-slots": (1, 0, 2, 3)}


def empty_cache(num_blocks: int, layout: str) -> torch.Tensor:
    """A zero ``[P, Hkv, bs, 2D]`` cache whose memory is laid out in ``layout`` order."""
    logical = (num_blocks, HKV, BS, 2 * D)
    order = LAYOUTS[layout]
    physical = torch.zeros(*(logical[d] for d in order))
    inverse = [order.index(d) for d in range(4)]
    cache = physical.permute(*inverse)
    assert cache.shape == logical
    return cache


def write_flash(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """What vLLM's ``reshape_and_cache_flash`` stores: ``[T, Hkv, D]`` keys/values at ``slots`` (-1: skipped)."""
    key_cache, value_cache = paged_flash.split_cache(cache)
    real = slots >= 0
    slots, key, value = slots[real].long(), key[real], value[real]
    key_cache[slots // BS, slots % BS] = key
    value_cache[slots // BS, slots % BS] = value


def test_split_cache_is_a_view_of_what_vllm_wrote():
    cache = empty_cache(4, "blocks-slots-heads")
    k, v = torch.randn(20, HKV, D), torch.randn(20, HKV, D)
    write_flash(cache, k, v, torch.arange(20) + BS)               # block 1, then block 2
    key_cache, value_cache = paged_flash.split_cache(cache)
    assert key_cache.data_ptr() == cache.data_ptr()
    assert torch.equal(key_cache[1, 3], k[3]) and torch.equal(value_cache[2, 0], v[BS])
    assert torch.equal(cache[1, 2, 5, :D], k[5, 2]) and torch.equal(cache[1, 2, 5, D:], v[5, 2])


RULES = {
    "windows": [Window(sink=8, alpha=-8.0, beta=0.25), Window(sink=0, alpha=20.0, beta=0.0),
                Window(sink=16, alpha=0.0, beta=0.5)],
    "mixed": [Dense(), Window(sink=4, alpha=13.0, beta=0.0), Window(sink=32, alpha=-16.0, beta=0.25)],
    "floored": [Window(sink=8, alpha=-200.0, beta=0.5, min_span=24), Dense(),
                Window(sink=0, alpha=-80.0, beta=0.25, min_span=12)],
}


def backends() -> list[str]:
    import importlib.util

    names = ["naive", "cpu", "auto"]          # auto on CPU: the native paged_decode kernel, cpu prefill
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names


@pytest.mark.parametrize(*grid({"prefill": ["plan", "dense"], "rule_name": sorted(RULES), "layout": sorted(LAYOUTS),
                               "backend": backends()}, marks=triton_marks))
def test_attend_matches_naive_over_decode_prefill_and_chunks(prefill, rule_name, layout, backend):
    """A mixed step: decodes at several lengths, a fresh prompt and a prompt chunk with context."""
    torch.manual_seed(1)
    rule = LayerRule.from_heads(tuple(RULES[rule_name]))
    prefill_rule = rule.as_dense() if prefill == "dense" else None   # a plan that prefills dense
    seqs = [(100, 1), (1, 1), (0, 40), (15, 1), (50, 23), (47, 1), (0, 1)]      # (context, new tokens)
    lengths = [c + q for c, q in seqs]
    tables, num_blocks = shuffled_tables(lengths, BS, spare=3)    # block 0: vLLM's null block
    keys = [torch.randn(n, HKV, D) for n in lengths]
    values = [torch.randn(n, HKV, D) for n in lengths]
    cache = empty_cache(num_blocks, layout)
    for b, (k, v) in enumerate(zip(keys, values)):
        pos = torch.arange(k.shape[0])
        write_flash(cache, torch.cat([k, torch.randn(2, HKV, D)]), torch.cat([v, torch.randn(2, HKV, D)]),
                    torch.cat([tables[b, pos // BS].long() * BS + pos % BS, torch.full((2,), -1)]))
    q_lens = [q for _, q in seqs]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    T = int(qsl[-1])
    query = torch.randn(T, HKV * G, D)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, seqs)])
    step = paged_flash.step_layout(qsl, torch.tensor(lengths, dtype=torch.int32), tables, BS)
    output = torch.full((T, HKV * G, D), float("nan"))
    scale = D ** -0.5
    paged_flash.attend(query, new_k, new_v, cache, output, step, rule, scale, backend=backend,
                       prefill_rule=prefill_rule)
    for b, (c, q) in enumerate(seqs):
        s, e = int(qsl[b]), int(qsl[b + 1])
        n = c + q
        used = rule.as_dense() if prefill == "dense" and q > 1 else rule     # decode tokens follow the plan
        span = used.span(torch.tensor([n]))
        ref = naive.sink_window_attention(query[s:e].transpose(0, 1)[None], keys[b].transpose(0, 1)[None],
                                          values[b].transpose(0, 1)[None], torch.arange(c, n)[None],
                                          torch.arange(n)[None, None], used.sink, span, scale)
        torch.testing.assert_close(output[s:e], ref[0].transpose(0, 1), atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"sequence {b} (context {c}, new {q}): {m}")
