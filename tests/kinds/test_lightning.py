"""``lightning`` heads through the framework and ``patch_model``: mixed layers, cache state, plan files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headwise import Plan, PlanError, kv_bytes, load_plan, patch_model, unpatch_model
from headwise.kinds.call import AttentionCall
from headwise.kinds.layer import LayerKinds
from headwise.kinds.hedgehog import hedgehog_features
from headwise.kinds.lightning import Lightning
from headwise.plan import ModelInfo
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.kinds.contract import (assert_cached_generation_equals_recomputation, assert_chunked_prefill_equals_one_pass,
                                  assert_padded_batches_equal_each_sample_alone, ids,
                                  logits_with_attention)

pytestmark = pytest.mark.usefixtures("no_grad")
F = 8


def head_weights(name: str, group: int, head_dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.q": torch.randn(group, head_dim, F // 2, generator=g),
            f"{name}.k": torch.randn(head_dim, F // 2, generator=g)}


def lightning_reference(q, k, v, q_w, k_w, decay):
    """One query head, written out: ``o_t = sum_s decay^(t-s) phi(q_t).phi(k_s) v_s / sum_s decay^(t-s) phi.phi``.

    q ``[B, T, D]``, k/v ``[B, T, D]``, q_w/k_w ``[D, F/2]``."""
    fq = hedgehog_features(q[:, None], q_w[None])[:, 0]
    fk = hedgehog_features(k[:, None], k_w[None])[:, 0]
    T = q.shape[1]
    t = torch.arange(T)
    weights = (fq @ fk.transpose(-1, -2)) * (decay ** (t[:, None] - t[None, :]).clamp(min=0).double()).float()
    weights = weights * (t[:, None] >= t[None, :])
    return (weights @ v.float()) / (weights.sum(-1, keepdim=True) + 1e-6)


def test_mixed_layer_equals_each_head_alone():
    """A layer with dense + window + lightning KV heads equals running each head as its own layer."""
    torch.manual_seed(0)
    B, G, T, D = 2, 2, 41, 16
    specs = (Dense(), Window(sink=2, alpha=6.0), Lightning(decay=0.9, feature_dim=F, weights="l0.h2"))
    weights = head_weights("l0.h2", G, D, 1)
    q, k, v = torch.randn(B, 3 * G, T, D), torch.randn(B, 3, T, D), torch.randn(B, 3, T, D)
    pos = torch.arange(T).expand(B, T)
    call = AttentionCall(module=None, query_pos=pos, key_pos=pos[:, None], lengths=torch.full((B,), T), scale=D ** -0.5)
    mixed = LayerKinds(0, specs, weights)
    assert [type(g).__name__ for g in mixed.groups] == ["SoftmaxKVGroup", "LightningGroup"]
    out = mixed.attention(q, k, v, call)                                            # [B, T, 6, D]
    for h, spec in enumerate(specs):
        alone = LayerKinds(0, (spec,), weights)
        expected = alone.attention(q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1], call)
        # a dense head alone takes sdpa, beside a window head the sink_window kernel: fp32 rounding apart
        assert torch.allclose(out[:, :, h * G:(h + 1) * G], expected, atol=2e-6), f"head {h}"
    for j in range(G):                                                               # and the lightning math
        ref = lightning_reference(q[:, 2 * G + j], k[:, 2], v[:, 2], weights["l0.h2.q"][j], weights["l0.h2.k"], 0.9)
        assert torch.allclose(out[:, :, 2 * G + j], ref, atol=1e-5)


def lightning_plan(model, decay=0.85) -> Plan:
    """Layer 0: lightning + dense; layer 1: window + lightning (tiny models have 2 KV heads)."""
    info = ModelInfo.of(model)
    G = info.num_heads // info.num_kv_heads
    weights = {**head_weights("l0.h0", G, info.head_dim, 0), **head_weights("l1.h1", G, info.head_dim, 1)}
    layers = ((Lightning(decay=decay, feature_dim=F, weights="l0.h0"), Dense()),
              (Window(sink=2, alpha=5.0), Lightning(decay=decay, feature_dim=F, weights="l1.h1")))
    return Plan(info, layers, {"method": "test"}, weights=weights)


def reference_logits(model, plan: Plan, input_ids: torch.Tensor) -> torch.Tensor:
    """Eager attention with each head's rule written out here (no headwise kernels)."""
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, Q, D = query.shape
        Hkv = key.shape[1]
        G = H // Hkv
        out = torch.empty_like(query)
        for h in range(H):
            spec = plan.layers[module.layer_idx][h // G]
            kh, vh = key[:, h // G], value[:, h // G]
            if isinstance(spec, Lightning):
                out[:, h] = lightning_reference(query[:, h], kh, vh, plan.weights[f"{spec.weights}.q"][h % G],
                                                plan.weights[f"{spec.weights}.k"], spec.decay)
                continue
            i, j = torch.arange(Q)[:, None], torch.arange(Q)[None, :]
            mask = j <= i
            if isinstance(spec, Window):
                mask &= (j < spec.sink) | (j > i - spec.span(Q))
            scores = (query[:, h] @ kh.transpose(-1, -2)) * scaling
            out[:, h] = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vh
        return out.transpose(1, 2), None

    return logits_with_attention(model, "headwise_lightning_reference", attention, input_ids)


def test_patched_model_equals_written_out_reference(tiny_model):
    plan = lightning_plan(tiny_model)
    x = ids(1, 37)
    expected = reference_logits(tiny_model, plan, x)
    patch_model(tiny_model, plan)
    assert (tiny_model(input_ids=x).logits - expected).abs().max() <= 1e-4


def test_cached_generation_equals_full_recomputation(llama):
    patch_model(llama, lightning_plan(llama))
    out = assert_cached_generation_equals_recomputation(llama)
    state = out.past_key_values.layers[0].states["lightning"]["s"]
    assert state.shape == (1, 1, F, llama.config.head_dim + 1)
    group = llama._headwise["runtime"].layers[0].groups[0]              # head 0 comes first
    assert group.state_spec() == {"s": ((1, F, llama.config.head_dim + 1), torch.float32)}


def test_chunked_prefill_then_decode_equals_one_pass(llama):
    patch_model(llama, lightning_plan(llama))
    assert_chunked_prefill_equals_one_pass(llama)


def test_padded_batches_equal_each_sample_alone(llama):
    patch_model(llama, lightning_plan(llama))
    assert_padded_batches_equal_each_sample_alone(llama)


def test_cache_holds_a_constant_state_instead_of_kv(llama):
    patch_model(llama, lightning_plan(llama))
    short = kv_bytes(llama(input_ids=ids(1, 50), use_cache=True).past_key_values)
    cache = llama(input_ids=ids(1, 300), use_cache=True).past_key_values
    long = kv_bytes(cache)
    D = llama.config.head_dim
    assert short["state"] == long["state"] == 2 * F * (D + 1) * 4
    # after prefill the lightning heads hold no KV (a decode step writes its own token into one slot)
    assert int((cache.layers[0].pos[:, 0] >= 0).sum()) == int((cache.layers[1].pos[:, 1] >= 0).sum()) == 0
    assert int((cache.layers[0].pos[:, 1] >= 0).sum()) == 300                     # the dense head


def test_plan_memory_per_head():
    spec = Lightning(decay=0.9, feature_dim=128, weights="x")
    assert spec.kept(8192) == 0
    assert spec.memory_bytes(8192, 64) == spec.memory_bytes(1024, 64) == 128 * 65 * 4
    assert Dense().memory_bytes(1000, 64, kv_bytes=2) == 2 * 1000 * 64 * 2


def test_plan_round_trips_through_json_and_safetensors(llama, tmp_path):
    plan = lightning_plan(llama)
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["weights"]["file"] == "p.safetensors" and len(data["weights"]["sha256"]) == 64
    loaded = load_plan(tmp_path / "p.json", llama)
    assert loaded == plan
    assert set(loaded.weights) == set(plan.weights)
    assert all(torch.equal(loaded.weights[n], plan.weights[n]) for n in plan.weights)
    x = ids(1, 30)
    patch_model(llama, plan)
    a = llama(input_ids=x).logits
    unpatch_model(llama)
    patch_model(llama, str(tmp_path / "p.json"))
    assert torch.equal(llama(input_ids=x).logits, a)


def test_missing_or_tampered_weights_are_refused_in_one_sentence(llama, tmp_path):
    lightning_plan(llama).save(tmp_path / "p.json")
    blob = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "p.safetensors").write_bytes(blob[:-4] + bytes(4))
    with pytest.raises(PlanError, match=r"does not match the sha256 recorded in plan .*; refit the plan"):
        load_plan(tmp_path / "p.json")
    (tmp_path / "p.safetensors").unlink()
    with pytest.raises(PlanError, match=r"needs its weights file .*p\.safetensors', which does not exist"):
        load_plan(tmp_path / "p.json")
    with pytest.raises(PlanError, match="load it with headwise.load_plan"):
        Plan.from_json(json.loads((tmp_path / "p.json").read_text()))


@pytest.mark.parametrize("field,value,message", [
    ("decay", 0.0, "must be in \\(0, 1\\]"), ("decay", 1.5, "must be in \\(0, 1\\]"),
    ("feature_dim", 7, "must be even"), ("weights", "", "must name the head's tensors"),
    ("decay", math.nan, "must be finite")])
def test_malformed_lightning_fields_are_refused(llama, tmp_path, field, value, message):
    lightning_plan(llama).save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    data["layers"][0]["heads"][0][field] = value
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"layer 0 head 0: .*{message}"):
        load_plan(tmp_path / "p.json")


def test_weights_of_the_wrong_shape_are_refused(llama):
    plan = lightning_plan(llama)
    bad = dict(plan.weights)
    bad["l0.h0.k"] = bad["l0.h0.k"][:, :2]
    with pytest.raises(PlanError, match="tensor 'l0.h0.k' has shape"):
        Plan(plan.model, plan.layers, weights=bad).validate()
    del bad["l0.h0.k"]
    with pytest.raises(PlanError, match="needs tensor 'l0.h0.k'"):
        Plan(plan.model, plan.layers, weights=bad).validate()


def test_plan_show_reports_memory_per_kind(llama, tmp_path, capsys):
    from headwise.cli import main

    lightning_plan(llama).save(tmp_path / "p.json")
    assert main(["plan", "show", str(tmp_path / "p.json"), "--lengths", "1024,4096", "--kv-bytes", "4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
    D = llama.config.head_dim
    state_mib = 2 * F * (D + 1) * 4 / 2**20
    assert rows["lightning"][1] == "2" and float(rows["lightning"][2]) == float(rows["lightning"][3]) == round(state_mib, 2)
    assert float(rows["dense"][3]) == round(2 * 4096 * D * 4 / 2**20, 2)
    assert "constant state" in out and (tmp_path / "p.png").exists()


def test_dense_prefill_reads_softmax_and_still_builds_the_state(llama):
    x = ids(1, 30, seed=4)
    dense = llama(input_ids=x).logits
    plan = lightning_plan(llama)
    patch_model(llama, plan, prefill="dense")
    out = llama(input_ids=x, use_cache=True)
    assert torch.allclose(out.logits, dense, atol=1e-5)
    unpatch_model(llama)
    patch_model(llama, plan)
    sparse = llama(input_ids=x, use_cache=True)
    for layer in (0, 1):                                   # the same state either way (layer 0 sees the same q/k/v)
        assert sparse.past_key_values.layers[layer].states["lightning"]["s"].shape == \
            out.past_key_values.layers[layer].states["lightning"]["s"].shape
    assert torch.allclose(sparse.past_key_values.layers[0].states["lightning"]["s"],
                          out.past_key_values.layers[0].states["lightning"]["s"], atol=1e-6)
