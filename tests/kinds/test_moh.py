"""``moh`` heads through the framework and ``patch_model``: routing, exactness, mixed layers, plan files, fitting."""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest
import torch
from transformers import AttentionInterface

from headwise import Plan, PlanError, load_plan, patch_model, unpatch_model
from headwise.kinds.call import AttentionCall
from headwise.kinds.layer import LayerKinds
from headwise.calibrate.select import allocate
from headwise.kinds.dense import Dense
from headwise.kinds.moh import MoH
from headwise.kinds.moh.attention import MoHGroup
from headwise.kinds.moh.fit import fit_routers, make_plan, relative_errors
from headwise.kinds.window import Window
from headwise.plan import ModelInfo
from tests.conftest import make_tiny
from tests.kinds.contract import (assert_cached_generation_equals_recomputation, assert_chunked_prefill_equals_one_pass,
                                  assert_padded_batches_equal_each_sample_alone, ids,
                                  logits_with_attention)

pytestmark = pytest.mark.usefixtures("no_grad")


def moh_weights(name: str, G: int, D: int, H: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.router": torch.randn(G * (D // 2), H, generator=g), f"{name}.bias": torch.randn(G, generator=g),
            f"{name}.fill": torch.randn(G, D, generator=g)}


def moh_plan(model, top_k=(2, 1)) -> Plan:
    """Layer 0: moh + moh (a pool of all 6 query heads); layer 1: window + moh with a window rule
    (tiny models: 2 KV heads, 3 query heads each)."""
    info = ModelInfo.of(model)
    G, D, H = info.num_heads // info.num_kv_heads, info.head_dim, info.num_heads
    weights = {**moh_weights("l0.h0", G, D, H, 0), **moh_weights("l0.h1", G, D, H, 1),
               **moh_weights("l1.h1", G, D, H, 2)}
    layers = ((MoH(top_k=top_k[0], weights="l0.h0"), MoH(top_k=top_k[0], weights="l0.h1")),
              (Window(sink=2, alpha=5.0), MoH(top_k=top_k[1], sink=3, alpha=6.0, beta=0.0, weights="l1.h1")))
    return Plan(info, layers, {"method": "test"}, weights=weights)


def all_moh_plan(model, top_k: int) -> Plan:
    info = ModelInfo.of(model)
    G, D, H = info.num_heads // info.num_kv_heads, info.head_dim, info.num_heads
    weights, layers = {}, []
    for i in range(info.num_layers):
        for h in range(info.num_kv_heads):
            weights.update(moh_weights(f"l{i}.h{h}", G, D, H, 10 * i + h))
        layers.append(tuple(MoH(top_k=top_k, weights=f"l{i}.h{h}") for h in range(info.num_kv_heads)))
    return Plan(info, tuple(layers), {"method": "test"}, weights=weights)


def reference_logits(model, plan: Plan, input_ids: torch.Tensor) -> torch.Tensor:
    """Eager attention with routing and each head's rule written out here (no headwise code)."""
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, Q, D = query.shape
        Hkv = key.shape[1]
        G = H // Hkv
        layer = plan.layers[module.layer_idx]
        pool = [h for h in range(Hkv) if isinstance(layer[h], MoH)]
        chosen = {}
        if pool:
            q_heads = [h * G + g for h in pool for g in range(G)]
            half = D // 2
            mags = torch.sqrt(query[..., :half] ** 2 + query[..., half:] ** 2)             # [B, H, Q, D/2]
            features = mags[:, q_heads].permute(0, 2, 1, 3).reshape(B, Q, -1)
            router = torch.cat([plan.weights[f"{layer[h].weights}.router"][:, q_heads] for h in pool])
            bias = torch.cat([plan.weights[f"{layer[h].weights}.bias"] for h in pool])
            top = (features @ router + bias).topk(layer[pool[0]].top_k, dim=-1).indices   # [B, Q, k]
            chosen = {qh: (top == i).any(-1) for i, qh in enumerate(q_heads)}
        out = torch.empty_like(query)
        i, j = torch.arange(Q)[:, None], torch.arange(Q)[None, :]
        for h in range(H):
            spec = layer[h // G]
            mask = j <= i
            if not isinstance(spec, Dense):
                mask &= (j < spec.sink) | (j > i - spec.span(Q))
            scores = (query[:, h] @ key[:, h // G].transpose(-1, -2)) * scaling
            o = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value[:, h // G]
            if isinstance(spec, MoH):
                fill = plan.weights[f"{spec.weights}.fill"][h % G]
                o = torch.where(chosen[h][..., None], o, fill)
            out[:, h] = o
        return out.transpose(1, 2), None

    return logits_with_attention(model, "headwise_moh_reference", attention, input_ids)


def one_sentence(message: str) -> bool:
    return message.endswith(".") and ". " not in message and "\n" not in message


@pytest.fixture
def routing(monkeypatch):
    """Every ``MoHGroup.route`` result as ``(layer, active [B, Hq, Q])``, in call order."""
    seen = []
    original = MoHGroup.route

    def route(self, q, query_pos):
        active = original(self, q, query_pos)
        seen.append((self.layer_idx, active))
        return active

    monkeypatch.setattr(MoHGroup, "route", route)
    return seen


def _call(B, Q):
    pos = torch.arange(Q).expand(B, Q)
    return AttentionCall(module=None, query_pos=pos, key_pos=pos[:, None], lengths=torch.full((B,), Q), scale=0.25)


# ---- exactness ----------------------------------------------------------------------------------
def test_patched_model_equals_written_out_reference(tiny_model, routing):
    plan = moh_plan(tiny_model)
    x = ids(1, 37)
    expected = reference_logits(tiny_model, plan, x)
    patch_model(tiny_model, plan)
    assert (tiny_model(input_ids=x).logits - expected).abs().max() <= 1e-4
    group = tiny_model._headwise["runtime"].layers[0].groups[0]
    assert isinstance(group, MoHGroup)
    assert int(routing[0][1].sum()) == 37 * 2 and routing[0][0] == 0                  # top_k heads per token


def test_router_selecting_every_head_equals_dense_exactly(tiny_model):
    """top_k = the pool's query heads: bit-identical logits and tokens to the dense plan."""
    x = ids(2, 29, seed=4)
    patch_model(tiny_model, "dense")
    dense = tiny_model(input_ids=x).logits
    dense_gen = tiny_model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    unpatch_model(tiny_model)
    patch_model(tiny_model, all_moh_plan(tiny_model, top_k=6))
    assert torch.equal(tiny_model(input_ids=x).logits, dense)
    assert torch.equal(tiny_model.generate(input_ids=x, max_new_tokens=6, do_sample=False, pad_token_id=0), dense_gen)


def test_routing_changes_the_output_and_routed_out_heads_give_their_mean(llama):
    plan = all_moh_plan(llama, top_k=2)
    x = ids(1, 20, seed=5)
    patch_model(llama, plan)
    routed = llama(input_ids=x).logits
    unpatch_model(llama)
    patch_model(llama, "dense")
    assert (llama(input_ids=x).logits - routed).abs().max() > 1e-3
    unpatch_model(llama)
    torch.testing.assert_close(routed, reference_logits(llama, plan, x), atol=1e-4, rtol=0)


def test_cached_generation_equals_full_recomputation(llama):
    patch_model(llama, moh_plan(llama))
    assert_cached_generation_equals_recomputation(llama)


def test_chunked_prefill_then_decode_equals_one_pass(llama):
    patch_model(llama, moh_plan(llama))
    assert_chunked_prefill_equals_one_pass(llama)


def test_padded_batches_equal_each_sample_alone(llama):
    patch_model(llama, moh_plan(llama))
    assert_padded_batches_equal_each_sample_alone(llama, compare_logits=False)


def test_dense_prefill_runs_every_head_then_decoding_routes(llama, routing):
    plan = moh_plan(llama)
    x = ids(1, 25, seed=3)
    patch_model(llama, "dense")
    dense = llama(input_ids=x).logits
    unpatch_model(llama)
    patch_model(llama, plan, prefill="dense")
    assert torch.allclose(llama(input_ids=x).logits, dense, atol=1e-5)
    assert routing == []                                                              # the prompt ran dense
    llama.generate(input_ids=x, max_new_tokens=3, do_sample=False, pad_token_id=0)   # decoding routes
    layer0 = [active for layer, active in routing if layer == 0]
    assert [a.shape[-1] for a in layer0] == [1, 1] and int(layer0[-1].sum()) == 2     # 2 decode steps route, the prompt not


# ---- mixed layers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [3, 1], ids=["selects-all", "routes"])
def test_mixed_layer_equals_each_part_alone(top_k):
    """A layer with moh + dense + window KV heads equals each part run as its own layer; with top_k = the
    moh head's query heads the moh part also equals a dense head exactly."""
    torch.manual_seed(0)
    B, G, T, D = 2, 3, 41, 16
    weights = moh_weights("l0.h0", G, D, 3 * G, 1)
    specs = (MoH(top_k=top_k, weights="l0.h0"), Dense(), Window(sink=2, alpha=6.0))
    q, k, v = torch.randn(B, 3 * G, T, D), torch.randn(B, 3, T, D), torch.randn(B, 3, T, D)
    call = _call(B, T)
    mixed = LayerKinds(0, specs, weights)
    assert [type(g).__name__ for g in mixed.groups] == ["MoHGroup", "SoftmaxKVGroup"]
    out = mixed.attention(q, k, v, call)
    for h, spec in enumerate(specs):
        alone = LayerKinds(0, (spec,), weights).attention(q[:, h * G:(h + 1) * G], k[:, h:h + 1], v[:, h:h + 1], call)
        assert torch.allclose(out[:, :, h * G:(h + 1) * G], alone, atol=2e-6), f"head {h}"
    if top_k == G:
        dense_alone = LayerKinds(0, (Dense(),)).attention(q[:, :G], k[:, :1], v[:, :1], call)
        assert torch.equal(out[:, :, :G], dense_alone)


def test_group_reads_only_selected_pairs(monkeypatch):
    """The group hands the kernel exactly its routing, and routed-out pairs get the head's mean."""
    from headwise.kinds.moh import attention as moh_attention

    torch.manual_seed(1)
    G, D, T = 3, 16, 30
    weights = {**moh_weights("a", G, D, 2 * G, 0), **moh_weights("b", G, D, 2 * G, 1)}
    group = MoHGroup(0, (0, 1), (MoH(top_k=2, weights="a"), MoH(top_k=2, weights="b")), weights)
    seen = {}
    real = moh_attention.routed_attention

    def spy(*args, **kwargs):
        seen["active"] = args[8]
        return real(*args, **kwargs)

    monkeypatch.setattr(moh_attention, "routed_attention", spy)
    q, k, v = torch.randn(1, 2 * G, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    out = group.attention(q, k, v, _call(1, T))                                   # [1, T, 6, D]
    active = seen["active"]
    assert active.shape == (1, 6, T) and bool((active.sum(1) == 2).all())
    fill = torch.cat([weights["a.fill"], weights["b.fill"]])
    routed_out = ~active[0].T                                                      # [T, 6]
    assert torch.equal(out[0][routed_out], fill[None].expand(T, -1, -1)[routed_out])


# ---- plan files and refusals ---------------------------------------------------------------------------
def test_plan_round_trips_through_json_and_safetensors(llama, tmp_path):
    plan = moh_plan(llama)
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["layers"][1]["heads"][1] == {"kind": "moh", "top_k": 1, "sink": 3, "alpha": 6.0, "beta": 0.0,
                                             "weights": "l1.h1"}
    loaded = load_plan(tmp_path / "p.json", llama)
    assert loaded == plan and all(torch.equal(loaded.weights[n], plan.weights[n]) for n in plan.weights)
    x = ids(1, 30)
    patch_model(llama, plan)
    a = llama(input_ids=x).logits
    unpatch_model(llama)
    patch_model(llama, str(tmp_path / "p.json"))
    assert torch.equal(llama(input_ids=x).logits, a)


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 0, "'top_k' must be >= 1"), ("top_k", 1.5, "'top_k' must be a whole number"),
    ("top_k", "2", "'top_k' must be a number"), ("beta", 1.5, "'beta' must be <= 1.0"),
    ("alpha", math.inf, "'alpha' must be finite"), ("alpha", 1e9, "far outside the model's context"),
    ("sink", -1, "'sink' must be >= 0"), ("weights", "", "must name the head's router tensors")])
def test_malformed_moh_fields_are_refused(llama, tmp_path, field, value, message):
    moh_plan(llama).save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    data["layers"][0]["heads"][0][field] = value
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=f"^layer 0 head 0: .*{message}") as error:
        load_plan(tmp_path / "p.json")
    assert one_sentence(str(error.value))


def test_missing_fields_unknown_fields_and_tensors_are_refused(llama, tmp_path):
    plan = moh_plan(llama)
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    del data["layers"][0]["heads"][1]["top_k"]
    (tmp_path / "q.json").write_text(json.dumps(data))
    (tmp_path / "q.safetensors").write_bytes((tmp_path / "p.safetensors").read_bytes())
    with pytest.raises(PlanError, match=r"layer 0 head 1: 'moh' head is missing field\(s\) \['top_k'\]\."):
        load_plan(tmp_path / "q.json")
    bad = dict(plan.weights)
    bad["l0.h0.router"] = bad["l0.h0.router"][:, :3]
    with pytest.raises(PlanError, match=r"tensor 'l0.h0.router' has shape .*; refit the plan \(headwise fit moh\)\.$"):
        Plan(plan.model, plan.layers, weights=bad).validate()
    bad["l0.h0.router"] = plan.weights["l0.h0.router"]
    del bad["l0.h0.fill"]
    with pytest.raises(PlanError, match=r"needs tensor 'l0.h0.fill'.*\(headwise fit moh\)\.$"):
        Plan(plan.model, plan.layers, weights=bad).validate()


def test_layer_level_top_k_is_checked_in_one_sentence(llama):
    info = ModelInfo.of(llama)
    plan = moh_plan(llama)
    mismatch = Plan(info, ((MoH(top_k=2, weights="l0.h0"), MoH(top_k=3, weights="l0.h1")), plan.layers[1]),
                    weights=plan.weights)
    with pytest.raises(PlanError, match=r"^layer 0: the moh heads of one layer must state the same top_k .*\[2, 3\]\.$"):
        patch_model(llama, mismatch)
    too_many = Plan(info, (plan.layers[0], (Dense(), MoH(top_k=4, weights="l1.h1"))), weights=plan.weights)
    with pytest.raises(PlanError, match=r"^layer 1: top_k 4 is more than the 3 query heads .*; use at most 3\.$"):
        patch_model(llama, too_many)
    assert getattr(llama, "_headwise", None) is None


def test_plan_show_lists_moh_heads(llama, tmp_path, capsys):
    from headwise.cli import main

    moh_plan(llama).save(tmp_path / "p.json")
    assert main(["plan", "show", str(tmp_path / "p.json"), "--lengths", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "moh heads: 3 of 4" in out and "top_k per layer: [2, 1]" in out
    assert "query heads run per token: 6 of 12" in out
    assert re.search(r"^\s*moh\s+3\s+[0-9.]+\s+[0-9.]+$", out, re.M)      # its row in the memory table


# ---- fitting ------------------------------------------------------------------------------------------
SPECIAL = list(range(100, 112))


def planted_model():
    """A tiny Llama whose layer-0 query head 4 (KV head 1) outputs something large only at "special" tokens.

    Special tokens have a large embedding component 0. Head 4's query and KV head 1's keys read only
    that component (in the slowest-rotating RoPE pair, so position barely matters): at a special
    token the head attends sharply to special tokens, whose values are large; elsewhere its query
    is zero and it averages the context (mostly small values).
    """
    model = make_tiny("llama", seed=0)
    attn = model.model.layers[0].self_attn
    D = model.config.head_dim
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[SPECIAL, 0] = 10.0
        attn.q_proj.weight[4 * D:5 * D] = 0.0
        attn.q_proj.weight[4 * D + D - 1, 0] = 1.0
        attn.k_proj.weight[D:2 * D] = 0.0
        attn.k_proj.weight[D + D - 1, 0] = 1.0
        attn.v_proj.weight[D:2 * D, 0] = 0.5
    return model


def planted_ids(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 100, (1, length), generator=g)
    special = torch.rand(length, generator=g) < 0.1
    x[0, special] = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (int(special.sum()),), generator=g)]
    return x


def test_fitted_router_selects_the_planted_head_where_it_matters(routing):
    model = planted_model()
    routers, _ = fit_routers(model, [planted_ids(256, s) for s in range(3)], [planted_ids(256, 9)])
    plan = make_plan(ModelInfo.of(model), routers, [1, 1], {"method": "moh"})
    x = planted_ids(300, 11)
    patch_model(model, plan)
    model(input_ids=x)
    active = [a for layer, a in routing if layer == 0][-1][0]                          # [6, T]
    special = torch.isin(x[0], torch.tensor(SPECIAL))
    special[:8] = False                                                                # skip the first few tokens
    assert float(active[4, special].float().mean()) >= 0.95
    assert float(active[4, ~special].float().mean()) <= 0.5
    # held-out error falls with every head added and is 0 with all of them
    errors = routers[0].errors
    assert errors[-1] == pytest.approx(0.0, abs=1e-9) and all(a >= b - 1e-9 for a, b in zip(errors, errors[1:]))


def test_relative_error_of_the_fitted_router_beats_a_fixed_head_choice():
    model = planted_model()
    routers, _ = fit_routers(model, [planted_ids(256, s) for s in range(3)], [])
    from headwise.kinds.moh.fit import _gram, activations

    held = [activations(model, planted_ids(256, 9))[0]]
    gram = _gram(model.model.layers[0].self_attn.o_proj.weight)
    r = routers[0]
    fitted = relative_errors(r.router, r.bias, r.fill, held, gram)[1]
    fixed = min(relative_errors(torch.zeros_like(r.router), torch.eye(6)[h], r.fill, held, gram)[1] for h in range(6))
    assert fitted < fixed


def test_allocate_minimises_the_summed_cost_exactly():
    costs = [[1.0, 0.5, 0.4, 0.0], [1.0, 0.9, 0.1, 0.0]]
    assert allocate(costs, 2) == [1, 1]
    assert allocate(costs, 3) == [1, 2]
    assert allocate(costs, 6) == [3, 3]
    assert allocate(costs, 2, minimum=0) == [0, 2] or allocate(costs, 2, minimum=0) == [1, 1]
    # not convex: a greedy head-by-head choice would stop at [1, 3] (cost 1.25); [3, 1] costs 0.5
    assert allocate([[1.0, 0.9, 0.9, 0.0], [1.0, 0.5, 0.4, 0.35]], 4) == [3, 1]
    with pytest.raises(ValueError, match="outside"):
        allocate(costs, 7)


def test_moh_fit_end_to_end_then_reuse(tiny_dir, tmp_path, capsys):
    from headwise.cli import main

    common = ["fit", "moh", "--model", str(tiny_dir), "--length", "256", "--samples", "2", "--held-out", "1",
              "--threads", "1", "--cache-dir", str(tmp_path / "work")]
    assert main(common + ["--active", "0.75,0.5", "--out", str(tmp_path / "m{active}.json")]) == 0
    out = capsys.readouterr().out
    assert "--active 0.75: 6 of 8 query heads per token" in out and "--active 0.5: 4 of 8" in out
    plan = load_plan(tmp_path / "m0.5.json")
    cal = plan.calibration
    assert cal["method"] == "moh" and sum(cal["top_k"]) == 4
    # the plan records how long each stage took (not asserted on: a quiet machine fits this model in ~0 s)
    assert set(cal["seconds"]) == {"samples", "capture", "fit", "per_layer_fit", "total"}
    assert all(s >= 0 for s in cal["seconds"].values())
    assert len(cal["held_out_error"]) == len(cal["loss_change"]) == len(plan.layers)
    assert cal["command"] == "headwise " + shlex.join(common + ["--active", "0.75,0.5", "--out",
                                                                str(tmp_path / "m{active}.json")])
    assert all(isinstance(h, MoH) and h.top_k == k for layer, k in zip(plan.layers, cal["top_k"]) for h in layer)
    assert main(common + ["--active", "1.0", "--out", str(tmp_path / "all.json")]) == 0
    assert "already fitted" in capsys.readouterr().out
    assert all(isinstance(h, Dense) for h in load_plan(tmp_path / "all.json").heads)
    assert main(common + ["--active", "0.5,0.75", "--out", str(tmp_path / "x.json")]) == 2    # one line, exit 2
    assert "must hold" in capsys.readouterr().err


def test_lm_eval_model_runs_a_moh_plan_file(tiny_dir, tmp_path):
    """``plan=<moh plan.json>`` in lm-eval's model args: loglikelihoods equal the patched model's, batched or not."""
    from lm_eval.api.instance import Instance

    from headwise.eval.lm import HeadwiseLM, is_elastic
    from headwise.models import load_model

    model, tokenizer = load_model(tiny_dir)
    plan = all_moh_plan(model, top_k=2)
    assert not is_elastic(plan)
    plan.save(tmp_path / "moh.json")
    texts = [("The quick brown fox", " jumps over the lazy dog"), ("A", " b c d e f g h"), ("Hello there", " world")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(texts)]
    results = {}
    for batch in (1, 3):
        lm = HeadwiseLM(pretrained=str(tiny_dir), plan=str(tmp_path / "moh.json"), batch_size=batch, device="cpu")
        assert isinstance(lm.model._headwise["runtime"].layers[0].groups[0], MoHGroup)
        results[batch] = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        unpatch_model(lm.model)
    assert results[1] == pytest.approx(results[3], abs=1e-4)
    patch_model(model, plan)
    context, continuation = (tokenizer(t, add_special_tokens=False).input_ids for t in texts[0])
    logits = model(input_ids=torch.tensor([context + continuation])).logits[0].log_softmax(-1)
    expected = sum(float(logits[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert results[1][0] == pytest.approx(expected, abs=1e-4)


def test_captured_gradients_predict_the_loss_change_of_a_small_output_change():
    """``activations``' gradients at the head outputs (``calibrate.capture``): a small change ``eps * u``
    of layer 1's head outputs changes the summed loss by ``eps * (g . u)``; parameters keep their
    ``requires_grad``."""
    from headwise.kinds.moh.fit import activations
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = make_tiny("llama", seed=2)
    x = ids(1, 24, seed=8)
    acts = activations(model, x)
    assert all(p.requires_grad for p in model.parameters())
    u = torch.randn_like(acts[1].outputs, generator=torch.Generator().manual_seed(0))

    def loss_with(eps):
        def attention(module, query, key, value, attention_mask, **kwargs):
            out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return (out + eps * u[None] if module.layer_idx == 1 else out), w

        AttentionInterface.register("headwise_moh_nudge", attention)
        model.set_attn_implementation("headwise_moh_nudge")
        try:
            logits = model(input_ids=x).logits.double()
        finally:
            model.set_attn_implementation("sdpa")
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))

    eps = 1e-3
    measured = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    assert measured == pytest.approx(float((acts[1].grads * u).sum()), rel=2e-2)
