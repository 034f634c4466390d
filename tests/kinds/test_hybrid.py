"""``hybrid`` heads (sink + exact window + linear attention over older keys, one normaliser) through the
framework and ``patch_model``: the formula written out, cache eviction/fold order, padding, plan files."""

from __future__ import annotations

import json

import pytest
import torch

from headwise import Plan, PlanError, kv_bytes, load_plan, patch_model, unpatch_model
from headwise.kinds.call import AttentionCall
from headwise.kinds.hybrid import Hybrid
from headwise.kinds.layer import LayerKinds
from headwise.kinds.hedgehog import hedgehog_features
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
            f"{name}.k": torch.randn(head_dim, F // 2, generator=g),
            f"{name}.log_mix": torch.randn(group, generator=g)}


def hybrid_reference(q, k, v, q_w, k_w, log_mix, spec: Hybrid, scale: float):
    """One query head written out: ``q, k, v [B, T, D]``, ``q_w, k_w [D, F/2]``, ``log_mix`` scalar."""
    T = q.shape[1]
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    exact = (s <= t) & ((s < spec.sink) | (s > t - spec.window))
    linear = (s >= spec.sink) & (s <= t - spec.window)
    a = (q.float() @ k.float().transpose(-1, -2)) * scale
    a = a.masked_fill(~exact, float("-inf"))
    e = torch.exp(a - a.amax(-1, keepdim=True))
    fq = hedgehog_features(q[:, None], q_w[None])[:, 0]
    fk = hedgehog_features(k[:, None], k_w[None])[:, 0]
    lag = (t - s).clamp(min=0).double()
    lin = (fq @ fk.transpose(-1, -2)) * (spec.decay ** lag).float() * linear * torch.exp(log_mix)
    w = e + lin
    return (w @ v.float()) / w.sum(-1, keepdim=True)


def hybrid_plan(model, windows=((2, 5), (0, 3)), decay=0.9) -> Plan:
    """Layer 0: hybrid + dense; layer 1: window + hybrid (tiny models have 2 KV heads)."""
    info = ModelInfo.of(model)
    G = info.num_heads // info.num_kv_heads
    (s0, w0), (s1, w1) = windows
    weights = {**head_weights("h.l0.h0", G, info.head_dim, 0), **head_weights("h.l1.h1", G, info.head_dim, 1)}
    layers = ((Hybrid(sink=s0, window=w0, decay=decay, feature_dim=F, weights="h.l0.h0"), Dense()),
              (Window(sink=2, alpha=5.0), Hybrid(sink=s1, window=w1, decay=decay, feature_dim=F, weights="h.l1.h1")))
    return Plan(info, layers, {"method": "test"}, weights=weights)


def all_hybrid_plan(model) -> Plan:
    """Every head hybrid; the two heads of a layer differ in sink and window (one group, per-head rules)."""
    info = ModelInfo.of(model)
    G = info.num_heads // info.num_kv_heads
    weights, layers = {}, []
    for i in range(info.num_layers):
        row = []
        for h, (sink, window) in enumerate(((1, 4), (3, 9))):
            name = f"h.l{i}.h{h}"
            weights.update(head_weights(name, G, info.head_dim, 10 * i + h))
            row.append(Hybrid(sink=sink, window=window, decay=0.8 + 0.1 * h, feature_dim=F, weights=name))
        layers.append(tuple(row))
    return Plan(info, tuple(layers), {"method": "test"}, weights=weights)


def reference_logits(model, plan: Plan, input_ids: torch.Tensor) -> torch.Tensor:
    """Eager attention with each head's rule written out here (no headwise kernels)."""
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, Q, D = query.shape
        G = H // key.shape[1]
        out = torch.empty_like(query)
        for h in range(H):
            spec = plan.layers[module.layer_idx][h // G]
            kh, vh = key[:, h // G], value[:, h // G]
            if isinstance(spec, Hybrid):
                w = plan.weights
                out[:, h] = hybrid_reference(query[:, h], kh, vh, w[f"{spec.weights}.q"][h % G], w[f"{spec.weights}.k"],
                                             w[f"{spec.weights}.log_mix"][h % G], spec, scaling)
                continue
            i, j = torch.arange(Q)[:, None], torch.arange(Q)[None, :]
            mask = j <= i
            if isinstance(spec, Window):
                mask &= (j < spec.sink) | (j > i - spec.span(Q))
            scores = (query[:, h] @ kh.transpose(-1, -2)) * scaling
            out[:, h] = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vh
        return out.transpose(1, 2), None

    return logits_with_attention(model, "headwise_hybrid_reference", attention, input_ids)


@pytest.mark.parametrize("plan_of", [hybrid_plan, all_hybrid_plan], ids=["mixed", "all-hybrid"])
def test_patched_model_equals_written_out_reference(tiny_model, plan_of):
    plan = plan_of(tiny_model)
    x = ids(1, 150)                               # past one 128-query block of the cpu kernel
    expected = reference_logits(tiny_model, plan, x)
    patch_model(tiny_model, plan)
    assert (tiny_model(input_ids=x).logits - expected).abs().max() <= 1e-4


def test_mixed_layer_equals_each_head_alone():
    """dense + window + hybrid KV heads in one layer equal each head run as its own layer."""
    torch.manual_seed(0)
    B, G, T, D = 2, 2, 41, 16
    specs = (Dense(), Window(sink=2, alpha=6.0), Hybrid(sink=1, window=4, decay=0.9, feature_dim=F, weights="x"))
    weights = head_weights("x", G, D, 1)
    q, k, v = torch.randn(B, 3 * G, T, D), torch.randn(B, 3, T, D), torch.randn(B, 3, T, D)
    pos = torch.arange(T).expand(B, T)
    call = AttentionCall(module=None, query_pos=pos, key_pos=pos[:, None], lengths=torch.full((B,), T), scale=D ** -0.5)
    mixed = LayerKinds(0, specs, weights)
    assert [type(g).__name__ for g in mixed.groups] == ["SoftmaxKVGroup", "HybridGroup"]
    out = mixed.attention(q, k, v, call)
    for h, spec in enumerate(specs):
        alone = LayerKinds(0, (spec,), weights).attention(q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1], call)
        assert torch.allclose(out[:, :, h * G:(h + 1) * G], alone, atol=2e-6), f"head {h}"
    for j in range(G):
        ref = hybrid_reference(q[:, 2 * G + j], k[:, 2], v[:, 2], weights["x.q"][j], weights["x.k"],
                               weights["x.log_mix"][j], specs[2], D ** -0.5)
        assert torch.allclose(out[:, :, 2 * G + j], ref, atol=1e-5)


def test_short_sequences_are_exact_softmax():
    """Until a key is older than sink + window the linear part is empty: the head is dense attention."""
    torch.manual_seed(1)
    B, G, T, D = 1, 3, 12, 16
    spec = Hybrid(sink=4, window=8, decay=0.9, feature_dim=F, weights="x")
    q, k, v = torch.randn(B, G, T, D), torch.randn(B, 1, T, D), torch.randn(B, 1, T, D)
    pos = torch.arange(T)[None]
    call = AttentionCall(module=None, query_pos=pos, key_pos=pos[:, None], lengths=torch.full((B,), T), scale=D ** -0.5)
    out = LayerKinds(0, (spec,), head_weights("x", G, D, 0)).attention(q, k, v, call)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.expand(B, G, T, D), v.expand(B, G, T, D), is_causal=True)
    assert torch.allclose(out, dense.transpose(1, 2), atol=1e-5)


@pytest.mark.parametrize("plan_of", [hybrid_plan, all_hybrid_plan], ids=["mixed", "all-hybrid"])
def test_cached_generation_equals_full_recomputation(llama, plan_of):
    patch_model(llama, plan_of(llama))
    assert_cached_generation_equals_recomputation(llama)


@pytest.mark.parametrize("cuts", [[17, 35], [1, 2, 3, 9, 30], [6, 7, 8, 30]],
                         ids=["two-chunks", "tokens-then-chunks", "chunks-at-the-window-edge"])
@pytest.mark.parametrize("plan_of", [hybrid_plan, all_hybrid_plan], ids=["mixed", "all-hybrid"])
def test_chunked_prefill_then_step_decode_equals_one_pass(llama, plan_of, cuts):
    """The eviction/fold order: every chunk boundary and decode step folds exactly the keys that left."""
    patch_model(llama, plan_of(llama))
    assert_chunked_prefill_equals_one_pass(llama, cuts, total=45)


def test_padded_batches_equal_each_sample_alone(llama):
    patch_model(llama, all_hybrid_plan(llama))
    assert_padded_batches_equal_each_sample_alone(llama)


def test_cache_holds_sink_window_plus_one_and_a_constant_state(llama):
    plan = hybrid_plan(llama)
    patch_model(llama, plan)
    D = llama.config.head_dim
    short = kv_bytes(llama(input_ids=ids(1, 50), use_cache=True).past_key_values)
    out = llama(input_ids=ids(1, 300), use_cache=True)
    cache = out.past_key_values
    assert short["state"] == kv_bytes(cache)["state"] == 2 * F * (D + 1) * 4
    # after prefill: sink + window keys; the next decode step adds its own (window + 1 then)
    assert int((cache.layers[0].pos[:, 0] >= 0).sum()) == 2 + 5
    assert int((cache.layers[1].pos[:, 1] >= 0).sum()) == 0 + 3
    for _ in range(4):
        out = llama(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
        assert int((cache.layers[0].pos[:, 0] >= 0).sum()) == 2 + 5 + 1
    assert plan.layers[0][0].kept(300) == 2 + 5 + 1 and plan.layers[0][0].kept(4) == 4


def test_a_missing_leaving_key_is_an_error():
    """The group refuses keys without the one that leaves the window (what a cache that evicted it
    one step early would pass) instead of silently leaving it out of the state."""
    G, D = 2, 16
    spec = Hybrid(sink=0, window=4, decay=0.9, feature_dim=F, weights="x")
    group = LayerKinds(0, (spec,), head_weights("x", G, D, 0)).groups[0]
    q, k, v = torch.randn(1, G, 1, D), torch.randn(1, 1, 5, D), torch.randn(1, 1, 5, D)
    query = torch.tensor([[20]])                                        # key 16 leaves the window at 20
    with pytest.raises(RuntimeError, match="leaves the window was not among the keys"):
        group.run(q, k[:, :, 1:], v[:, :, 1:], query, torch.arange(17, 21)[None, None], None, D ** -0.5)
    out, state = group.run(q, k, v, query, torch.arange(16, 21)[None, None], None, D ** -0.5)
    assert out.shape == (1, G, 1, D) and state.abs().sum() > 0


def test_plan_round_trips_and_tampered_or_missing_weights_are_refused(llama, tmp_path):
    plan = hybrid_plan(llama)
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["layers"][0]["heads"][0] == {"kind": "hybrid", "sink": 2, "window": 5, "decay": 0.9, "feature_dim": F,
                                             "weights": "h.l0.h0"}
    loaded = load_plan(tmp_path / "p.json", llama)
    assert loaded == plan and all(torch.equal(loaded.weights[n], plan.weights[n]) for n in plan.weights)
    x = ids(1, 30)
    patch_model(llama, plan)
    a = llama(input_ids=x).logits
    unpatch_model(llama)
    patch_model(llama, str(tmp_path / "p.json"))
    assert torch.equal(llama(input_ids=x).logits, a)
    blob = (tmp_path / "p.safetensors").read_bytes()
    (tmp_path / "p.safetensors").write_bytes(blob[:-4] + bytes(4))
    with pytest.raises(PlanError, match=r"does not match the sha256 recorded in plan .*; refit the plan"):
        load_plan(tmp_path / "p.json")
    (tmp_path / "p.safetensors").unlink()
    with pytest.raises(PlanError, match=r"needs its weights file .*p\.safetensors', which does not exist"):
        load_plan(tmp_path / "p.json")


def test_weights_without_the_mixing_factor_are_refused(llama):
    plan = hybrid_plan(llama)
    bad = {n: t for n, t in plan.weights.items() if n != "h.l0.h0.log_mix"}
    with pytest.raises(PlanError, match="needs tensor 'h.l0.h0.log_mix'"):
        Plan(plan.model, plan.layers, weights=bad).validate()


@pytest.mark.parametrize("field,value,message", [
    ("window", 0, "must be >= 1"), ("sink", -1, "must be >= 0"), ("decay", 0.0, "must be in \\(0, 1\\]"),
    ("feature_dim", 7, "must be even"), ("window", 1022, "must be shorter than the model's context")])
def test_malformed_hybrid_fields_are_refused(llama, tmp_path, field, value, message):
    hybrid_plan(llama).save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    data["layers"][0]["heads"][0][field] = value
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"layer 0 head 0: .*{message}"):
        load_plan(tmp_path / "p.json")


def test_dense_prefill_reads_softmax_and_builds_the_same_state(llama):
    x = ids(1, 30, seed=4)
    dense = llama(input_ids=x).logits
    plan = hybrid_plan(llama)
    patch_model(llama, plan, prefill="dense")
    out = llama(input_ids=x, use_cache=True)
    assert torch.allclose(out.logits, dense, atol=1e-5)
    unpatch_model(llama)
    patch_model(llama, plan)
    sparse = llama(input_ids=x, use_cache=True)
    # layer 0 sees the same q/k/v either way, so its state is the same
    assert torch.allclose(sparse.past_key_values.layers[0].states["hybrid"]["s"],
                          out.past_key_values.layers[0].states["hybrid"]["s"], atol=1e-6)


def test_plan_show_reports_memory_and_marks_heads(llama, tmp_path, capsys, monkeypatch):
    """Memory per kind (hybrid: sink + window + 1 slots and a constant state), and the heatmap's letters."""
    import matplotlib.axes

    from headwise.cli import main

    drawn = []
    original = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: drawn.append((int(x), int(y), s)) or original(self, x, y, s, *a, **k))
    hybrid_plan(llama).save(tmp_path / "p.json")
    assert main(["plan", "show", str(tmp_path / "p.json"), "--lengths", "1024", "--kv-bytes", "4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
    D = llama.config.head_dim
    expected = ((2 + 5 + 1) + (0 + 3 + 1)) * 2 * D * 4 + 2 * F * (D + 1) * 4
    assert rows["hybrid"][1] == "2" and float(rows["hybrid"][2]) == round(expected / 2**20, 2)
    # (head, layer, letter): layer 0 = hybrid + dense, layer 1 = window + hybrid
    assert sorted(drawn) == [(0, 0, "H"), (1, 0, "D"), (1, 1, "H")]
    assert (tmp_path / "p.png").exists()


def test_heatmap_marks_lightning_heads(llama, tmp_path, monkeypatch):
    import matplotlib.axes

    from headwise.calibrate.heatmap import plan_heatmap
    from tests.kinds.test_lightning import lightning_plan

    drawn = []
    original = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: drawn.append((int(x), int(y), s)) or original(self, x, y, s, *a, **k))
    plan_heatmap(lightning_plan(llama), tmp_path / "l.png", [256, 1024])
    # per panel: layer 0 = lightning + dense, layer 1 = window + lightning
    assert sorted(drawn) == sorted([(0, 0, "L"), (1, 0, "D"), (1, 1, "L")] * 2)
