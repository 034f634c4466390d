"""Dense prompt attention of the vLLM plugin (a chunk reading every earlier key and its own causally)
against the reference, ``sink_window.naive`` with every head dense: torch's flash path
(``paged.causal_attention`` / ``paged.dense_prefill``) and vLLM's own kernel over a scratch cache
(``cpu_prefill.dense_prefill``, vLLM's CPU ops; no engine started)."""

from __future__ import annotations

import pytest
import torch

from headwise.integrations.vllm import paged
from headwise.kernels.sink_window import naive
from headwise.kinds.dense import Dense
from headwise.patches.runtime import LayerRule

from .helpers import shuffled_tables

BS = 32


def reference(q, k, v, context, scale):
    """``[Q, H, D]`` naive dense attention of queries at ``context..`` over keys ``[L, Hkv, D]``."""
    Q, L, Hkv = q.shape[0], k.shape[0], k.shape[1]
    rule = LayerRule.from_heads(tuple([Dense()] * Hkv))
    out = naive.sink_window_attention(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(),
                                      v.transpose(0, 1)[None].float(), torch.arange(context, L)[None],
                                      torch.arange(L)[None, None], rule.sink, rule.span(torch.tensor([L])), scale)
    return out[0].transpose(0, 1)


TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 32), (6, 1, 32)])
@pytest.mark.parametrize("context,new", [(0, 1), (0, 77), (5, 1), (40, 33), (130, 200)])
def test_causal_attention_matches_naive(dtype, H, Hkv, D, context, new):
    torch.manual_seed(context + new + H)
    L = context + new
    q = torch.randn(new, H, D, dtype=dtype)
    k, v = torch.randn(L, Hkv, D, dtype=dtype), torch.randn(L, Hkv, D, dtype=dtype)
    ck = k[:context].transpose(0, 1) if context else None
    cv = v[:context].transpose(0, 1) if context else None
    out = paged.causal_attention(q, k[context:], v[context:], ck, cv, D ** -0.5)
    assert out.shape == (new, H, D) and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference(q, k, v, context, D ** -0.5), **TOL[dtype])


def step_case(seqs, Hkv, G, D, dtype, null_row=None):
    """A cache holding sequences ``(context, new)`` in shuffled blocks, the step's tensors and layout."""
    lengths = [c + n for c, n in seqs]
    tables, num_blocks = shuffled_tables(lengths, BS, spare=2)
    keys = [torch.randn(n, Hkv, D, dtype=dtype) for n in lengths]
    values = [torch.randn(n, Hkv, D, dtype=dtype) for n in lengths]
    cache = torch.zeros(num_blocks, Hkv, BS, 2 * D, dtype=dtype)
    for b, (k, v) in enumerate(zip(keys, values)):
        pos = torch.arange(k.shape[0])
        paged.write(cache, k, v, tables[b, pos // BS].long() * BS + pos % BS)
    if null_row is not None:
        tables[null_row, 0] = paged.NULL_BLOCK            # a context block given back: the general path reads it
    qsl = torch.tensor([0, *torch.tensor([n for _, n in seqs]).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), Hkv * G, D, dtype=dtype)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, seqs)])
    step = paged.StepLayout.build(qsl, torch.tensor(lengths), tables, BS, Hkv,
                                  prefilling=torch.ones(len(seqs), dtype=torch.bool))
    return keys, values, cache, qsl, query, new_k, new_v, step


@pytest.mark.parametrize("kernel", ["flash", "vllm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hkv,G,D", [(3, 3, 64), (2, 1, 32)])
def test_attend_dense_prefill_matches_naive(kernel, dtype, Hkv, G, D):
    """Fresh prompts and chunks with context in one step, through ``paged.attend`` with every head prefilling
    dense; a sequence whose first block was given back takes the general path (only held keys)."""
    dense_kernel = None
    if kernel == "vllm":
        cpu_prefill = pytest.importorskip("headwise.integrations.vllm.cpu_prefill")
        dense_kernel = cpu_prefill.dense_prefill
    torch.manual_seed(Hkv * G + D)
    seqs = [(0, 70), (45, 20), (0, 1), (100, 64), (64, 40)]
    keys, values, cache, qsl, query, new_k, new_v, step = step_case(seqs, Hkv, G, D, dtype, null_row=4)
    rule = LayerRule.from_heads(tuple([Dense()] * Hkv))
    output = torch.full(query.shape, float("nan"), dtype=dtype)
    scale = D ** -0.5
    paged.attend(query, new_k, new_v, cache, output, step, rule, scale, prefill_rule=rule, dense_kernel=dense_kernel)
    for b, (c, n) in enumerate(seqs):
        s, e = int(qsl[b]), int(qsl[b + 1])
        k, v = keys[b], values[b]
        if b == 4:                                        # block 0 nulled: positions 0..31 are not read
            ref = naive.sink_window_attention(
                query[s:e].transpose(0, 1)[None].float(), k[BS:].transpose(0, 1)[None].float(),
                v[BS:].transpose(0, 1)[None].float(), torch.arange(c, c + n)[None],
                torch.arange(BS, c + n)[None, None], rule.sink, rule.span(torch.tensor([c + n])), scale)[0]
            ref = ref.transpose(0, 1)
        else:
            ref = reference(query[s:e], k, v, c, scale)
        torch.testing.assert_close(output[s:e].float(), ref, **TOL[dtype])
