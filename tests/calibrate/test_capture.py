"""``calibrate.capture``: the one attention override is reversible and disarmed after its block,
``observing`` leaves the model's output unchanged, and ``capture`` records what attention saw."""

from __future__ import annotations

import pytest
import torch

from headwise.calibrate.capture import attention_override, capture, observing
from tests.conftest import make_tiny


def _ids(T=20, seed=0):
    return torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(seed))


def test_override_restores_the_model_after_an_error_and_is_disarmed_afterwards():
    model = make_tiny("llama")
    flags = [p.requires_grad for p in model.parameters()]

    def zero(module, query, key, value, attention_mask, **kwargs):
        assert not any(p.requires_grad for p in model.parameters())          # frozen while inside
        return torch.zeros_like(query).transpose(1, 2), None

    with pytest.raises(RuntimeError, match="boom"):
        with attention_override(model, zero, name="headwise_test_zero", freeze=True):
            model(input_ids=_ids())
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert [p.requires_grad for p in model.parameters()] == flags
    model.set_attn_implementation("headwise_test_zero")
    try:
        with pytest.raises(RuntimeError, match="ran outside its headwise.calibrate.capture block"):
            model(input_ids=_ids())
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_prefill_only_attention_refuses_a_cached_step():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = make_tiny("llama")
    with attention_override(model, sdpa_attention_forward, name="headwise_test_prefill", prefill_only=True):
        out = model(input_ids=_ids(), use_cache=True)
        with pytest.raises(ValueError, match="needs a full causal forward without a cache"):
            model(input_ids=_ids(1), past_key_values=out.past_key_values, use_cache=True)


def test_override_refuses_a_patched_model():
    from headwise import Plan, patch_model, unpatch_model

    model = make_tiny("llama")
    patch_model(model, Plan.uniform(model, 0.5))
    try:
        with pytest.raises(RuntimeError, match="unpatch_model"):
            with attention_override(model, lambda *a, **k: None):
                pass
    finally:
        unpatch_model(model)


@torch.no_grad()
def test_observing_changes_nothing_and_sees_every_layer():
    model = make_tiny("llama")
    x = _ids()
    expected = model(input_ids=x).logits
    seen = []
    with observing(model, lambda layer, q, k, v, out, scaling: seen.append((layer, q.shape, k.shape, out.shape))):
        got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert seen == [(i, (1, 6, 20, 16), (1, 2, 20, 16), (1, 20, 6, 16)) for i in range(2)]


def test_capture_records_what_attention_saw():
    """The captured q/k/v give back the captured outputs through causal softmax attention, and only
    the asked fields are kept (gradients only when asked)."""
    model = make_tiny("qwen2", seed=1)
    layers = capture(model, _ids(24, 2))
    assert len(layers) == 2
    for layer in layers:
        q, k, v = layer.query, layer.key.repeat_interleave(3, 0), layer.value.repeat_interleave(3, 0)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)   # [H, T, D]
        torch.testing.assert_close(layer.output, want.transpose(0, 1), rtol=1e-5, atol=1e-6)
        assert layer.output_grad is None
    only = capture(model, _ids(24, 2), ("key",), gradients=True)
    assert only[0].query is None and only[0].key.shape == (2, 24, 16) and only[0].output_grad.shape == (24, 6, 16)
    with pytest.raises(ValueError, match="not keys"):
        capture(model, _ids(), ("keys",))
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        capture(model, torch.zeros(2, 5, dtype=torch.long))


def test_profiling_at_a_plan_refuses_heads_outside_the_calibrators_candidates():
    from headwise.calibrate.profile import profile_sample
    from headwise.kinds.lightning import Lightning
    from headwise.kinds.dense import Dense
    from headwise.plan import ModelInfo, Plan

    model = make_tiny("llama")
    info = ModelInfo.of(model)
    weights = {"x.q": torch.zeros(3, 16, 4), "x.k": torch.zeros(16, 4)}
    plan = Plan(info, ((Lightning(decay=0.9, feature_dim=8, weights="x"), Dense()), (Dense(), Dense())),
                weights=weights)
    with pytest.raises(TypeError, match="candidate kinds \\(dense, window\\), not 'lightning'"):
        profile_sample(model, _ids(), 15, block=4, plan=plan)
