"""patch_model on tiny random models of four architectures (fast) and the real model (slow)."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from headwise import Plan, PlanError, expected_length, kv_bytes, patch_model, unpatch_model
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.conftest import make_tiny


pytestmark = pytest.mark.usefixtures("no_grad")


def mixed_plan(model, sink=3, alpha=5.0, beta=0.0) -> Plan:
    """Layer 0: window + dense; other layers: two different windows (eviction really happens)."""
    base = Plan.dense(model)
    layers = []
    for i in range(base.model.num_layers):
        if i == 0:
            layers.append((Window(sink=sink, alpha=alpha, beta=beta), Dense()))
        else:
            layers.append((Window(sink=sink, alpha=alpha, beta=beta), Window(sink=0, alpha=alpha + 4, beta=beta)))
    return Plan(base.model, tuple(layers))


def reference_logits(model, plan: Plan, input_ids: torch.Tensor, n: int | None = None,
                     dense_queries: int = 0) -> torch.Tensor:
    """Eager attention with per-head masks written out here, independent of headwise's kernels.
    Queries at positions below ``dense_queries`` read every earlier key (a dense prefill)."""
    n_ctx = n or input_ids.shape[1]

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, Q, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        out = torch.empty_like(query)
        for h in range(H):
            spec = plan.layers[module.layer_idx][h // (H // Hkv)]
            mask = torch.zeros(Q, S, dtype=torch.bool)
            for i in range(Q):
                for j in range(S):
                    if j > i:
                        continue
                    if isinstance(spec, Dense) or i < dense_queries:
                        mask[i, j] = True
                    else:
                        mask[i, j] = j < spec.sink or j > i - spec.span(n_ctx)
            scores = (query[:, h] @ key[:, h // (H // Hkv)].transpose(-1, -2)) * scaling
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            out[:, h] = probs @ value[:, h // (H // Hkv)]
        return out.transpose(1, 2), None

    AttentionInterface.register("headwise_test_reference", attention)
    model.set_attn_implementation("headwise_test_reference")
    try:
        return model(input_ids=input_ids).logits
    finally:
        model.set_attn_implementation("sdpa")


def ids(batch, length, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def test_dense_plan_equals_unpatched_sdpa(tiny_model):
    x = ids(2, 57)
    expected = tiny_model(input_ids=x).logits
    patch_model(tiny_model, "dense")
    got = tiny_model(input_ids=x).logits
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.125])
def test_window_plan_equals_masked_eager_reference(tiny_model, beta):
    plan = mixed_plan(tiny_model, beta=beta)
    x = ids(1, 40)
    expected = reference_logits(tiny_model, plan, x)
    patch_model(tiny_model, plan)
    got = tiny_model(input_ids=x).logits
    assert (got - expected).abs().max() <= 1e-4


def test_window_covering_everything_equals_dense(tiny_model):
    x = ids(2, 50)
    expected = tiny_model(input_ids=x).logits
    wide = Plan(Plan.dense(tiny_model).model,
                tuple((Window(sink=2, alpha=500.0, beta=0.0),) * 2 for _ in range(2)))
    patch_model(tiny_model, wide)
    assert (tiny_model(input_ids=x).logits - expected).abs().max() <= 5e-5   # another kernel, fp32 rounding


def test_unpatch_restores_the_model(llama):
    x = ids(1, 30)
    before = llama(input_ids=x).logits
    hooks = len(llama.model._forward_pre_hooks)
    patch_model(llama, mixed_plan(llama))
    assert llama.config._attn_implementation == "headwise"
    assert not torch.allclose(llama(input_ids=x).logits, before)
    unpatch_model(llama)
    assert llama.config._attn_implementation == "sdpa"
    assert len(llama.model._forward_pre_hooks) == hooks
    assert torch.equal(llama(input_ids=x).logits, before)
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch_model(llama)


def test_patch_twice_and_foreign_plan_are_refused(llama):
    patch_model(llama, "dense")
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(llama, "dense")
    unpatch_model(llama)
    with pytest.raises(PlanError, match="calibrate a plan for this model"):
        patch_model(llama, Plan.dense(make_tiny("qwen2")))


def _cached_greedy(model, x, steps, attention_mask=None):
    out = model.generate(input_ids=x, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False,
                         min_new_tokens=steps, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_cached_generation_equals_full_recomputation(tiny_model, beta):
    """Greedy decoding with the headwise cache == recomputing the whole sequence each step,
    well past the point where window heads evict."""
    plan = mixed_plan(tiny_model, sink=2, alpha=6.0, beta=beta)
    x, steps = ids(1, 20, seed=1), 30
    patch_model(tiny_model, plan)
    target = x.shape[1] + steps if beta else None      # elastic spans are sized for the final length
    with expected_length(tiny_model, target):
        seq, logits = _cached_greedy(tiny_model, x, steps)
        for t in range(steps):
            full = tiny_model(input_ids=seq[:, : x.shape[1] + t], use_cache=False).logits[:, -1]
            assert torch.allclose(full, logits[:, t], atol=1e-4), f"step {t}"
            full[:, tiny_model.config.eos_token_id] = float("-inf")       # min_new_tokens bans EOS
            assert int(full.argmax()) == int(seq[0, x.shape[1] + t])


def test_left_padded_generation_equals_each_sample_alone(tiny_model):
    patch_model(tiny_model, mixed_plan(tiny_model, sink=2, alpha=5.0))
    lengths, steps = [23, 9, 16], 12
    prompts = [ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    x = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for b, p in enumerate(prompts):
        x[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    batched, batched_logits = _cached_greedy(tiny_model, x, steps, attention_mask=mask)
    for b, p in enumerate(prompts):
        alone, alone_logits = _cached_greedy(tiny_model, p[None], steps)
        assert torch.equal(batched[b, width:], alone[0, len(p):])
        assert torch.allclose(batched_logits[b], alone_logits[0], atol=1e-4)


def test_right_padded_batch_equals_each_sample_alone(tiny_model):
    patch_model(tiny_model, mixed_plan(tiny_model, sink=2, alpha=5.0, beta=0.125))
    lengths = [31, 12, 20]
    width = max(lengths)
    x = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        x[b, :n] = ids(1, n, seed=n)[0]
        mask[b, :n] = 1
    batched = tiny_model(input_ids=x, attention_mask=mask).logits
    for b, n in enumerate(lengths):
        alone = tiny_model(input_ids=x[b:b + 1, :n]).logits[0]
        assert torch.allclose(batched[b, :n], alone, atol=1e-4)


@pytest.mark.parametrize("density", [0.25, 0.5])
def test_cache_keeps_only_the_plans_share(llama, density):
    n = 400
    dense_cache = llama(input_ids=ids(2, n), use_cache=True).past_key_values
    dense = kv_bytes(dense_cache)["kept"]
    patch_model(llama, Plan.uniform(llama, density=density, sink=8))
    out = llama(input_ids=ids(2, n), use_cache=True)
    used = kv_bytes(out.past_key_values)
    assert used["kept"] <= (density + 0.05) * dense
    assert used["allocated"] <= (density + 0.05) * dense


def test_decode_keeps_window_heads_bounded(llama):
    """During decoding a beta=0 window head stays at sink + span slots (ring writes)."""
    patch_model(llama, Plan.uniform(llama, density=0.25, sink=4, length=64))     # 4 sink + 12 window
    seq = llama.generate(input_ids=ids(1, 64), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    layer = seq.past_key_values.layers[0]
    assert layer.get_seq_length() == 64 + 39
    assert int((layer.pos >= 0).sum(-1).max()) == 16
    assert layer.keys.shape[-2] == 16


def test_native_sliding_window_models_are_refused():
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tests.conftest import TINY
    model = AutoModelForCausalLM.from_config(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16,
                                                         max_window_layers=0))
    with pytest.raises(ValueError, match="sliding_attention"):
        patch_model(model, "dense")


# ---- the real embedded model -------------------------------------------------------------------

@pytest.fixture
def real(real_model):
    model, tokenizer = real_model
    yield model, tokenizer
    if getattr(model, "_headwise", None):
        unpatch_model(model)


def _prose_ids(tokenizer, n):
    import pydoc_data.topics as topics
    text = " ".join(topics.topics.values())
    return tokenizer(text, return_tensors="pt").input_ids[:, :n]


@pytest.mark.slow
def test_real_model_dense_plan_equals_sdpa(real):
    model, tokenizer = real
    x = _prose_ids(tokenizer, 300)
    expected = model(input_ids=x).logits
    patch_model(model, "dense")
    assert (model(input_ids=x).logits - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_real_model_window_plan_equals_reference(real):
    model, tokenizer = real
    plan = Plan.uniform(model, density=0.25, sink=4)
    x = _prose_ids(tokenizer, 48)
    expected = reference_logits(model, plan, x)
    patch_model(model, plan)
    assert (model(input_ids=x).logits - expected).abs().max() <= 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_real_model_kv_bytes_follow_density(real, density):
    model, tokenizer = real
    x = _prose_ids(tokenizer, 2048)
    c = model.config
    dense = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * x.shape[1] * 4
    patch_model(model, Plan.uniform(model, density=density, sink=64))
    used = kv_bytes(model(input_ids=x, use_cache=True).past_key_values)
    assert used["kept"] <= (density + 0.05) * dense


@pytest.mark.slow
def test_real_model_cached_generation_equals_recomputation(real):
    model, tokenizer = real
    x, steps = _prose_ids(tokenizer, 160), 12
    patch_model(model, Plan.uniform(model, density=0.25, sink=4))
    with expected_length(model, x.shape[1] + steps):
        out = model.generate(input_ids=x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        assert out.past_key_values.layers[0].keys.shape[-2] < x.shape[1] // 2     # eviction happened
        for t in range(steps):
            full = model(input_ids=out.sequences[:, : x.shape[1] + t], use_cache=False).logits[:, -1]
            assert torch.allclose(full, out.logits[t], atol=1e-3), f"step {t}"
            full[:, model.config.eos_token_id] = float("-inf")
            assert int(full.argmax()) == int(out.sequences[0, x.shape[1] + t])


# ---- prefill mode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_dense_prefill_then_cached_decode_equals_hand_reference(tiny_model, beta):
    """With prefill "dense" the prompt runs dense, the cache keeps only each head's sink + window,
    and every decode step equals eager attention where prompt queries read everything and later
    queries read only their plan's keys."""
    plan = mixed_plan(tiny_model, sink=2, alpha=6.0, beta=beta)
    x, steps = ids(1, 20, seed=1), 12
    target = x.shape[1] + steps if beta else None
    patch_model(tiny_model, plan, prefill="dense")
    try:
        with expected_length(tiny_model, target):
            seq, logits = _cached_greedy(tiny_model, x, steps)
            prefill = tiny_model(input_ids=x, use_cache=True)
    finally:
        unpatch_model(tiny_model)
    dense = tiny_model(input_ids=x).logits
    assert torch.allclose(prefill.logits, dense, atol=1e-5)           # the prompt itself is dense
    patch_model(tiny_model, plan)
    try:
        with expected_length(tiny_model, target):
            sparse_kept = kv_bytes(tiny_model(input_ids=x, use_cache=True).past_key_values)["kept"]
    finally:
        unpatch_model(tiny_model)
    assert kv_bytes(prefill.past_key_values)["kept"] == sparse_kept     # same KV kept either way
    for t in range(steps):
        ref = reference_logits(tiny_model, plan, seq[:, : x.shape[1] + t], n=target, dense_queries=x.shape[1])
        assert torch.allclose(ref[:, -1], logits[:, t], atol=1e-4), f"step {t}"
    # and it differs from a sparse prefill once window heads evict (the mode really changes something)
    sparse_ref = reference_logits(tiny_model, plan, seq[:, : x.shape[1] + 1], n=target)
    assert not torch.allclose(sparse_ref[:, -1], logits[:, 1], atol=1e-4)


def test_prefill_mode_is_read_from_the_plan_and_validated(llama, tmp_path):
    import dataclasses
    import json

    from headwise import load_plan

    plan = dataclasses.replace(mixed_plan(llama), prefill="dense")
    plan.save(tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json").prefill == "dense"
    data = json.loads((tmp_path / "p.json").read_text())
    del data["prefill"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_plan(tmp_path / "old.json").prefill == "sparse"        # plans without the field load unchanged
    data["prefill"] = "lazy"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match="prefill"):
        load_plan(tmp_path / "bad.json")
    patch_model(llama, plan)
    assert llama._headwise["runtime"].prefill == "dense"
    unpatch_model(llama)
    patch_model(llama, plan, prefill="sparse")
    assert llama._headwise["runtime"].prefill == "sparse"
    unpatch_model(llama)
    with pytest.raises(ValueError, match="prefill"):
        patch_model(llama, plan, prefill="lazy")
