"""The profiler's |E| equals the loss change of dropping an attention entry (linearised), checked by
brute force on a tiny random GQA Llama in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from headwise.calibrate.profile import answer_loss, profile_sample
from tests.conftest import make_tiny

T, ANSWER_START = 12, 8


class _Edit:
    """Which attention entry the brute-force attention changes, and how far along the drop."""

    layer = head = row = col = -1
    t = 0.0


def _eager_with_edit(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal attention; at ``_Edit``'s (layer, query head, row) it moves the attention row
    a fraction ``t`` of the way to "entry ``col`` dropped, row renormalised"."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    n = query.shape[-2]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    if module.layer_idx == _Edit.layer:
        row = attn[0, _Edit.head, _Edit.row]
        dropped = row.clone()
        dropped[_Edit.col] = 0
        dropped = dropped / dropped.sum()
        attn = attn.clone()
        attn[0, _Edit.head, _Edit.row] = row + _Edit.t * (dropped - row)
    return (attn @ v).transpose(1, 2).contiguous(), None


def _loss(model, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=T - ANSWER_START + 1).logits
        return float(answer_loss(logits, ids, ANSWER_START))


def _loss_at(model, ids, t: float) -> float:
    _Edit.t = t
    return _loss(model, ids)


def _derivative(f, h: float) -> float:
    """Five-point central difference of ``f`` at 0."""
    return (8 * (f(h / 2) - f(-h / 2)) - (f(h) - f(-h))) / (6 * h)


def _rms_norm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm computing in the input's dtype (the original upcasts to fp32 only)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def setup():
    """A float64 tiny GQA Llama (6 query / 2 KV heads), a sample and its 1x1-tile profile
    (``|E|`` tiles and signed ``E`` tiles)."""
    with pytest.MonkeyPatch.context() as patch:
        # fp32 inside RMSNorm would leave ~1e-7 noise in the loss and spoil finite differences
        patch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        model = make_tiny("llama", seed=3).double()
        ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(0))
        blocks, signed, loss = profile_sample(model, ids, ANSWER_START, block=1)
        yield model, ids, blocks, signed, loss


def test_profile_loss_is_the_answer_cross_entropy(setup):
    model, ids, _, _, loss = setup
    assert model.config._attn_implementation == "sdpa"     # restored after profiling
    assert loss == pytest.approx(_loss(model, ids), rel=1e-10)


@pytest.mark.parametrize("layer,kv_head,row,col", [(0, 0, 9, 3), (1, 1, 10, 0), (1, 0, 7, 7), (0, 1, 5, 2)])
def test_e_matches_brute_force_drop(setup, layer, kv_head, row, col):
    model, ids, blocks, signed, _ = setup
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    AttentionInterface.register("edit_test", _eager_with_edit)
    AttentionMaskInterface.register("edit_test", lambda *a, **k: None)
    model.set_attn_implementation("edit_test")
    try:
        _Edit.layer, _Edit.row, _Edit.col = layer, row, col
        linearised, net = 0.0, 0.0
        for head in range(kv_head * group, (kv_head + 1) * group):
            _Edit.head = head
            # E is the loss change, to first order in A, of the exact drop-and-renormalise move of
            # the attention row: a fourth-order central difference along that move recovers it
            e = _derivative(lambda t: _loss_at(model, ids, t), 1e-3)
            linearised, net = linearised + abs(e), net + e
    finally:
        _Edit.layer = -1
        model.set_attn_implementation("sdpa")
    assert blocks[layer, kv_head, row, col] == pytest.approx(linearised, rel=1e-7, abs=1e-12)
    assert signed[layer, kv_head, row, col] == pytest.approx(net, rel=1e-7, abs=1e-12)
    assert blocks[layer, kv_head, row, col] > 0


def test_blocks_are_causal_and_tiles_sum_entries(setup):
    model, ids, blocks, signed, _ = setup
    for values in (blocks, signed):
        assert np.all(values[:, :, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
        assert np.all(values[:, :, 0, 0] == 0)              # the first query can only attend to itself
    assert np.all(np.abs(signed) <= blocks + 1e-15)
    tiled, tiled_signed, _ = profile_sample(model, ids, ANSWER_START, block=4)
    for per_entry, tiles in ((blocks, tiled), (signed, tiled_signed)):
        summed = per_entry.reshape(*per_entry.shape[:2], T // 4, 4, T // 4, 4).sum(axis=(3, 5))
        np.testing.assert_allclose(tiles, summed, rtol=1e-9, atol=1e-15)


def test_input_gradients_match_autograd_of_eager_attention():
    """The custom backward returns the same dq/dk/dv as autograd through eager attention."""
    from headwise.calibrate.profile import BlockRecorder, _ProfiledCausalAttention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 70, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 70, 16, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, 70, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 6, 70, 16, dtype=torch.float64, generator=g)
    rec = BlockRecorder(1, 2, 70, block=64)
    (_ProfiledCausalAttention.apply(q, k, v, 0.25, 0, rec) * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    (ref * w).sum().backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad)
    assert rec.blocks.shape == (1, 2, 2, 2) and rec.blocks[0, :, 0, 1].sum() == 0 and rec.blocks.sum() > 0
