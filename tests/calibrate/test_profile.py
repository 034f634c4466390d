"""The profiler's |E| equals the loss change of dropping an attention entry (linearised), checked by
brute force on a tiny random GQA Llama in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from headwise.calibrate.profile import answer_loss, profile_sample
from headwise.plan import ModelInfo, Plan
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.conftest import make_tiny

T, ANSWER_START = 12, 8


class _Edit:
    """Which attention entry the brute-force attention changes, how far along the move, and the
    plan whose banded attention runs (``None``: dense causal)."""

    layer = head = row = col = -1
    t = 0.0
    plan = None


def _eager_with_edit(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager causal (or ``_Edit.plan``-banded) attention; at ``_Edit``'s (layer, query head, row)
    it moves the attention row a fraction ``t`` of the way to "entry ``col`` dropped, row
    renormalised" for a kept entry, or to "entry ``col`` added back, row renormalised" for an
    entry the band drops."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scaling
    n = query.shape[-2]
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    logits = scores.clone()
    if _Edit.plan is not None:
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        for h in range(query.shape[1]):
            spec = _Edit.plan.layers[module.layer_idx][h // group]
            if isinstance(spec, Window):
                logits[0, h] = logits[0, h].masked_fill((j >= spec.sink) & (j <= i - spec.span(n)), float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    if module.layer_idx == _Edit.layer:
        row = attn[0, _Edit.head, _Edit.row]
        if row[_Edit.col] > 0:
            target = row.clone()
            target[_Edit.col] = 0
            target = target / target.sum()
        else:
            p = torch.exp(scores[0, _Edit.head, _Edit.row, _Edit.col]
                          - torch.logsumexp(logits[0, _Edit.head, _Edit.row], dim=-1))
            target = row / (1 + p)
            target[_Edit.col] = p / (1 + p)
        attn = attn.clone()
        attn[0, _Edit.head, _Edit.row] = row + _Edit.t * (target - row)
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


def _brute_force(model, ids, layer, kv_head, row, col, plan=None) -> tuple[float, float]:
    """(sum of |dL|, sum of dL) over the KV head's query heads for moving entry (row, col)."""
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    AttentionInterface.register("edit_test", _eager_with_edit)
    AttentionMaskInterface.register("edit_test", lambda *a, **k: None)
    model.set_attn_implementation("edit_test")
    try:
        _Edit.layer, _Edit.row, _Edit.col, _Edit.plan = layer, row, col, plan
        linearised, net = 0.0, 0.0
        for head in range(kv_head * group, (kv_head + 1) * group):
            _Edit.head = head
            # E is the loss change, to first order in A, of the exact drop-and-renormalise move of
            # the attention row: a fourth-order central difference along that move recovers it
            e = _derivative(lambda t: _loss_at(model, ids, t), 1e-3)
            linearised, net = linearised + abs(e), net + e
    finally:
        _Edit.layer, _Edit.plan = -1, None
        model.set_attn_implementation("sdpa")
    return linearised, net


@pytest.mark.parametrize("layer,kv_head,row,col", [(0, 0, 9, 3), (1, 1, 10, 0), (1, 0, 7, 7), (0, 1, 5, 2)])
def test_e_matches_brute_force_drop(setup, layer, kv_head, row, col):
    model, ids, blocks, signed, _ = setup
    linearised, net = _brute_force(model, ids, layer, kv_head, row, col)
    assert blocks[layer, kv_head, row, col] == pytest.approx(linearised, rel=1e-7, abs=1e-12)
    assert signed[layer, kv_head, row, col] == pytest.approx(net, rel=1e-7, abs=1e-12)
    assert blocks[layer, kv_head, row, col] > 0


def _banded_plan(model) -> Plan:
    """Layer 0: a 2-sink, 3-span window and a dense head; layer 1: two windows (sinks 1 and 0)."""
    return Plan(ModelInfo.of(model), ((Window(sink=2, alpha=3.0), Dense()),
                                      (Window(sink=1, alpha=2.0, beta=0.25), Window(sink=0, alpha=4.0))))


@pytest.fixture(scope="module")
def banded(setup):
    model, ids, *_ = setup
    plan = _banded_plan(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        blocks, signed, loss = profile_sample(model, ids, ANSWER_START, block=1, plan=plan)
        yield plan, blocks, signed, loss


# (layer, kv head, row, col): kept band entries, kept sink entries, and entries the band drops
@pytest.mark.parametrize("layer,kv_head,row,col", [
    (0, 0, 9, 8), (0, 0, 10, 1), (0, 0, 9, 4), (0, 1, 9, 4),
    (1, 0, 10, 0), (1, 0, 10, 3), (1, 1, 10, 7), (1, 1, 10, 2)])
def test_e_at_a_plan_matches_brute_force(setup, banded, layer, kv_head, row, col):
    """At a plan, a kept entry records the loss change of dropping it and a dropped entry the
    loss change of leaving it out (minus that of adding it back, renormalised)."""
    model, ids, *_ = setup
    plan, blocks, signed, _ = banded
    linearised, net = _brute_force(model, ids, layer, kv_head, row, col, plan)
    spec = plan.layers[layer][kv_head]
    dropped = isinstance(spec, Window) and spec.sink <= col <= row - spec.span(T)
    sign = -1.0 if dropped else 1.0
    assert blocks[layer, kv_head, row, col] == pytest.approx(linearised, rel=1e-7, abs=1e-12)
    assert signed[layer, kv_head, row, col] == pytest.approx(sign * net, rel=1e-7, abs=1e-12)
    assert blocks[layer, kv_head, row, col] > 0


def test_profile_at_a_plan_reports_the_banded_models_loss(setup, banded):
    model, ids, *_ = setup
    plan, _, _, loss = banded
    AttentionInterface.register("edit_test", _eager_with_edit)
    AttentionMaskInterface.register("edit_test", lambda *a, **k: None)
    model.set_attn_implementation("edit_test")
    _Edit.plan = plan
    try:
        expected = _loss(model, ids)
    finally:
        _Edit.plan = None
        model.set_attn_implementation("sdpa")
    assert loss == pytest.approx(expected, rel=1e-10)
    assert loss != pytest.approx(setup[4], rel=1e-3)    # the bands do change the model


def test_dense_plan_profiles_like_no_plan(setup):
    model, ids, blocks, signed, loss = setup
    got = profile_sample(model, ids, ANSWER_START, block=1, plan=Plan.dense(model))
    np.testing.assert_array_equal(got[0], blocks)
    np.testing.assert_array_equal(got[1], signed)


def test_checkpointing_changes_no_tile(setup):
    model, ids, blocks, signed, loss = setup
    for checkpoint in (True, False):
        got = profile_sample(model, ids, ANSWER_START, block=1, checkpoint=checkpoint)
        np.testing.assert_array_equal(got[0], blocks)
        np.testing.assert_array_equal(got[1], signed)
        assert got[2] == loss
        assert not model.training and not model.is_gradient_checkpointing


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
    (_ProfiledCausalAttention.apply(q, k, v, 0.25, 0, rec, None) * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    (ref * w).sum().backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad)
    assert rec.blocks.shape == (1, 2, 2, 2) and rec.blocks[0, :, 0, 1].sum() == 0 and rec.blocks.sum() > 0


def test_banded_forward_and_gradients_match_autograd_of_masked_sdpa():
    """With bands, the forward output and dq/dk/dv equal autograd through masked sdpa, across
    several row chunks (the chunk size is forced small)."""
    from headwise.calibrate import profile as prof

    g = torch.Generator().manual_seed(2)
    T_, sink, spans = 150, 4, (7, 150)
    q = torch.randn(1, 6, T_, 16, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 2, T_, 16, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 2, T_, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(1, 6, T_, 16, dtype=torch.float64, generator=g)
    bands = torch.tensor([[sink, spans[0]], [T_, spans[1]]])
    rec = prof.BlockRecorder(1, 2, T_, block=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prof, "CHUNK_ELEMENTS", 6 * T_ * 32)       # 32-row chunks
        out = prof._ProfiledCausalAttention.apply(q, k, v, 0.25, 0, rec, bands)
        (out * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    i, j = torch.arange(T_)[:, None], torch.arange(T_)[None, :]
    window = (j <= i) & ((j < sink) | (j > i - spans[0]))
    mask = torch.stack([window] * 3 + [j <= i] * 3)[None]           # [1, 6, T, T]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    (ref * w).sum().backward()
    for a, t in zip(got, (q, k, v)):
        torch.testing.assert_close(a, t.grad)
