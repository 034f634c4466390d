"""``softplus`` heads through the framework and ``patch_model``: exactness, caches, mixed layers, plans."""

from __future__ import annotations

import json
import math

import pytest
import torch

from headwise import Plan, PlanError, kv_bytes, load_plan, patch_model, unpatch_model
from headwise.kinds.call import AttentionCall
from headwise.kinds.layer import LayerKinds
from headwise.kinds.lightning import Lightning
from headwise.kinds.softplus import Softplus
from headwise.plan import ModelInfo
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.kinds.test_lightning import F, head_weights, lightning_reference
from tests.kinds.contract import (assert_cached_generation_equals_recomputation, assert_chunked_prefill_equals_one_pass,
                                  assert_padded_batches_equal_each_sample_alone, ids,
                                  logits_with_attention)

pytestmark = pytest.mark.usefixtures("no_grad")

#: LSSAR with a log-length scale relative to 16 tokens (so short test sequences cross it), exp with
#: re-weighting on a window, and LSSA without re-weighting.
LSSAR = Softplus(nonlinearity="softplus", scale="log", scale_length=16, temperature=1.2, power=3.0)
EXP_WINDOW = Softplus(nonlinearity="exp", scale="log_floor", scale_length=16, power=8.0, sink=2, alpha=9.0, beta=0.0)
LSSA = Softplus(nonlinearity="softplus", scale="none", temperature=0.7, power=0.0, sink=1, alpha=4.0, beta=0.5)
SOFTMAX = Softplus(nonlinearity="exp", scale="none", power=0.0)


def plan_of(model, layers, weights=None) -> Plan:
    return Plan(ModelInfo.of(model), tuple(tuple(layer) for layer in layers), {"method": "test"}, weights=weights or {})


def softplus_plan(model) -> Plan:
    """Layer 0: LSSAR + windowed exp re-weighting; layer 1: LSSA (window) + dense (tiny models have 2 KV heads)."""
    return plan_of(model, [(LSSAR, EXP_WINDOW), (LSSA, Dense())])


def row_reference(q, k, v, spec, scale, n_keys):
    """One query head, the paper's steps written out per row. q/k/v ``[B, T, D]``; keys at positions 0..T-1."""
    B, T, D = q.shape
    out = torch.zeros(B, T, D, dtype=torch.float64)
    for t in range(T):
        keep = torch.zeros(T, dtype=torch.bool)
        keep[:t + 1] = True
        if isinstance(spec, (Window, Softplus)):
            span = spec.span(n_keys)
            keep &= (torch.arange(T) < spec.sink) | (torch.arange(T) > t - span)
        n = int(keep.sum())
        s = torch.einsum("bd,bsd->bs", q[:, t].double(), k.double()) * scale            # [B, T]
        if isinstance(spec, Softplus):
            ratio = math.log(n) / math.log(spec.scale_length)
            m = spec.temperature * ({"none": 1.0, "log": ratio, "log_floor": max(1.0, ratio)}[spec.scale])
            e = torch.nn.functional.softplus(m * s) if spec.nonlinearity == "softplus" else torch.exp(m * s - (m * s).max())
        else:
            e = torch.exp(s - s.max())
        e = e * keep
        a = e / e.sum(-1, keepdim=True)
        if isinstance(spec, Softplus) and spec.power > 0:
            r = torch.relu(n * a - 1) ** spec.power
            a = torch.where(r.sum(-1, keepdim=True) > 0, r / r.sum(-1, keepdim=True).clamp(min=1e-300), a)
        out[:, t] = torch.einsum("bs,bsd->bd", a, v.double())
    return out.float()


def reference_logits(model, plan: Plan, input_ids: torch.Tensor) -> torch.Tensor:
    """Eager attention with each head's rule written out here (no headwise kernels)."""
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, Q, D = query.shape
        G = H // key.shape[1]
        out = torch.empty_like(query)
        for h in range(H):
            spec = plan.layers[module.layer_idx][h // G]
            kh, vh = key[:, h // G], value[:, h // G]
            if isinstance(spec, Lightning):
                out[:, h] = lightning_reference(query[:, h], kh, vh, plan.weights[f"{spec.weights}.q"][h % G],
                                                plan.weights[f"{spec.weights}.k"], spec.decay)
            else:
                out[:, h] = row_reference(query[:, h], kh, vh, spec, scaling, Q)
        return out.transpose(1, 2), None

    return logits_with_attention(model, "headwise_softplus_reference", attention, input_ids)


def test_exp_without_reweighting_equals_the_unpatched_model_exactly(tiny_model):
    x = ids(2, 45)
    expected = tiny_model(input_ids=x).logits
    gen = tiny_model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    patch_model(tiny_model, plan_of(tiny_model, [(SOFTMAX, SOFTMAX)] * 2))
    assert torch.equal(tiny_model(input_ids=x).logits, expected)
    assert torch.equal(tiny_model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0), gen)


@pytest.mark.parametrize("backend", ["naive", "cpu"])
def test_exp_without_reweighting_on_a_window_equals_the_window_head(llama, backend):
    """Through the softplus kernel (not the sdpa shortcut): the same logits as a ``window`` head."""
    x = ids(1, 50, seed=2)
    patch_model(llama, plan_of(llama, [(Window(2, 9.0, 0.25), Dense())] * 2), backend=backend)
    expected = llama(input_ids=x).logits
    unpatch_model(llama)
    as_softplus = Softplus(nonlinearity="exp", scale="none", power=0.0, sink=2, alpha=9.0, beta=0.25)
    patch_model(llama, plan_of(llama, [(as_softplus, Dense())] * 2), backend=backend)
    torch.testing.assert_close(llama(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)


def test_patched_model_equals_written_out_reference(tiny_model):
    plan = softplus_plan(tiny_model)
    x = ids(1, 37)
    expected = reference_logits(tiny_model, plan, x)
    patch_model(tiny_model, plan)
    assert (tiny_model(input_ids=x).logits - expected).abs().max() <= 1e-4


def test_cached_generation_equals_full_recomputation(llama):
    patch_model(llama, softplus_plan(llama))
    assert_cached_generation_equals_recomputation(llama)


def test_chunked_prefill_then_decode_equals_one_pass(llama):
    """With the target length known (the LSSA head's window is elastic), chunks + decode = one pass."""
    patch_model(llama, softplus_plan(llama))
    assert_chunked_prefill_equals_one_pass(llama, length_known=True)


def test_padded_batches_equal_each_sample_alone(llama):
    patch_model(llama, softplus_plan(llama))
    assert_padded_batches_equal_each_sample_alone(llama, steps=6, compare_logits=False)


def test_mixed_layer_equals_each_head_alone():
    """softplus + window + dense + lightning KV heads in one layer equal each head run as its own layer."""
    torch.manual_seed(0)
    B, G, T, D = 2, 2, 41, 16
    specs = (LSSAR, Window(sink=2, alpha=6.0), Dense(), Lightning(decay=0.9, feature_dim=F, weights="l0.h3"),
             EXP_WINDOW)
    weights = head_weights("l0.h3", G, D, 1)
    Hkv = len(specs)
    q, k, v = torch.randn(B, Hkv * G, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    pos = torch.arange(T).expand(B, T)
    call = AttentionCall(module=None, query_pos=pos, key_pos=pos[:, None], lengths=torch.full((B,), T), scale=D ** -0.5)
    mixed = LayerKinds(0, specs, weights)
    assert [type(g).__name__ for g in mixed.groups] == ["SoftplusGroup", "SoftmaxKVGroup", "LightningGroup"]
    out = mixed.attention(q, k, v, call)
    for h, spec in enumerate(specs):
        alone = LayerKinds(0, (spec,), weights)
        expected = alone.attention(q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1], call)
        assert torch.allclose(out[:, :, h * G:(h + 1) * G], expected, atol=2e-6), f"head {h}"
        if isinstance(spec, Softplus):                                              # and the softplus math
            for j in range(G):
                ref = row_reference(q[:, h * G + j], k[:, h], v[:, h], spec, D ** -0.5, T)
                assert torch.allclose(out[:, :, h * G + j], ref, atol=1e-5), f"head {h} query {j}"


def test_cache_keeps_the_window_it_reads(llama):
    """Default fields keep everything (as dense); window fields keep sink + span, as a window head."""
    patch_model(llama, plan_of(llama, [(LSSAR, Softplus(sink=4, alpha=16.0, beta=0.0))] * 2))
    cache = llama(input_ids=ids(1, 100), use_cache=True).past_key_values
    kept = (cache.layers[0].pos >= 0).sum(-1)[0].tolist()
    assert kept == [100, 4 + 16 - 1]       # the window the next query reads: sink + span - 1 earlier keys
    assert LSSAR.kept(8192) == 8192 and Softplus(sink=4, alpha=16.0, beta=0.0).kept(8192) == 20
    assert kv_bytes(cache)["state"] == 0


def test_dense_prefill_reads_softmax(llama):
    x = ids(1, 30, seed=4)
    dense = llama(input_ids=x).logits
    patch_model(llama, softplus_plan(llama), prefill="dense")
    assert torch.allclose(llama(input_ids=x).logits, dense, atol=1e-5)


def test_plan_round_trips_through_json(llama, tmp_path):
    plan = softplus_plan(llama)
    plan.save(tmp_path / "p.json")
    head = json.loads((tmp_path / "p.json").read_text())["layers"][0]["heads"][0]
    assert head == {"kind": "softplus", "nonlinearity": "softplus", "scale": "log", "scale_length": 16,
                    "temperature": 1.2, "power": 3.0, "sink": 0, "alpha": 0.0, "beta": 1.0}
    loaded = load_plan(tmp_path / "p.json", llama)
    assert loaded == plan
    x = ids(1, 30)
    patch_model(llama, plan)
    a = llama(input_ids=x).logits
    unpatch_model(llama)
    patch_model(llama, str(tmp_path / "p.json"))
    assert torch.equal(llama(input_ids=x).logits, a)


@pytest.mark.parametrize("field,value,message", [
    ("nonlinearity", "relu", r"field 'nonlinearity' must be one of \['softplus', 'exp'\], got 'relu'\."),
    ("scale", "sqrt", r"field 'scale' must be one of \['none', 'log', 'log_floor'\], got 'sqrt'\."),
    ("scale_length", 1, r"field 'scale_length' must be >= 2, got 1\."),
    ("scale_length", 100.5, r"field 'scale_length' must be a whole number, got 100\.5\."),
    ("temperature", 0.0, r"field 'temperature' must be above 0, got 0\.0\."),
    ("temperature", math.nan, r"field 'temperature' must be finite, got nan\."),
    ("power", -1.0, r"field 'power' must be >= 0\.0, got -1\.0\."),
    ("power", 100.0, r"field 'power' must be <= 64\.0, got 100\.0\."),
    ("power", "3", r"field 'power' must be a number, got '3'\."),
    ("beta", 1.5, r"field 'beta' must be <= 1\.0, got 1\.5\."),
    ("sink", -1, r"field 'sink' must be >= 0, got -1\."),
    ("sink", 5000, r"sink 5000 must be smaller than the model's context of 1024 tokens\."),
])
def test_malformed_fields_are_refused_in_one_sentence(llama, tmp_path, field, value, message):
    softplus_plan(llama).save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    data["layers"][0]["heads"][0][field] = value
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"^layer 0 head 0: {message}$") as error:
        load_plan(tmp_path / "p.json")
    assert str(error.value).count(". ") == 0 and "\n" not in str(error.value)


@pytest.mark.parametrize("change,message", [
    (lambda h: h.pop("power"), r"'softplus' head is missing field\(s\) \['power'\]\."),
    (lambda h: h.update(p=2), r"'softplus' head has unknown field\(s\) \['p'\]\."),
])
def test_missing_or_unknown_fields_are_refused(llama, tmp_path, change, message):
    softplus_plan(llama).save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    change(data["layers"][1]["heads"][0])
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"^layer 1 head 0: {message}$"):
        load_plan(tmp_path / "p.json")


def test_plan_show_prints_a_mixed_plan(llama, tmp_path, capsys):
    from headwise.cli import main

    weights = head_weights("l1.h1", llama.config.num_attention_heads // llama.config.num_key_value_heads,
                           llama.config.head_dim, 0)
    plan = plan_of(llama, [(LSSAR, Window(sink=4, alpha=60.0)),
                           (Dense(), Lightning(decay=0.9, feature_dim=F, weights="l1.h1"))], weights)
    plan.save(tmp_path / "mixed.json")
    assert main(["plan", "show", str(tmp_path / "mixed.json"), "--lengths", "1024,4096", "--kv-bytes", "4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 3}
    D = llama.config.head_dim
    assert set(rows) >= {"softplus", "window", "dense", "lightning", "total"}
    assert rows["softplus"][1] == "1" and float(rows["softplus"][3]) == round(2 * 4096 * D * 4 / 2**20, 2)
    assert float(rows["window"][3]) == round(2 * 64 * D * 4 / 2**20, 2)
    assert (tmp_path / "mixed.png").exists()
