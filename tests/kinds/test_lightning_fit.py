"""Fitting lightning and hybrid heads: the fit's quadratic form equals the kernel, fitting lowers the
error, head choice under a budget, and ``headwise fit lightning`` / ``headwise fit hybrid`` end to end
(resume, plan files)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from headwise.cli import main
from headwise.kernels.lightning import lightning_attention
from headwise.kinds.hedgehog import hedgehog_features
from headwise.kinds.lightning import Lightning
from headwise.kinds.hybrid import Hybrid
from headwise.kinds.layer import LayerKinds
from headwise.kinds.lightning.fit import (choose_heads, fit_head, hybrid_outputs, linear_outputs, relative_error,
                                          softmax_outputs)
from headwise.plan import load_plan


def qkv(T=48, G=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(G, T, D, generator=g), torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)


def test_fit_form_equals_the_lightning_kernel():
    q, k, v = qkv()
    qw, kw = torch.randn(2, 8, 5), torch.randn(8, 5)
    log_decay = torch.tensor(-0.05)
    fitted_form = linear_outputs(q, k, v, qw, kw, log_decay)
    fq, fk = hedgehog_features(q[None], qw), hedgehog_features(k[None, None], kw[None])
    values = torch.cat([v, torch.ones(48, 1)], -1)[None, None]
    num, _ = lightning_attention(fq, fk, values, torch.full((1, 1, 48), -0.05), backend="naive")
    assert torch.allclose(fitted_form, (num[..., :-1] / (num[..., -1:] + 1e-6))[0], atol=1e-5)


@pytest.mark.parametrize("sink,window", [(0, 5), (3, 7)])
def test_hybrid_fit_form_equals_the_hybrid_kind(sink, window):
    """The quadratic form the fit trains is what a ``hybrid`` head computes (kernels, delayed keys)."""
    q, k, v = qkv()
    qw, kw, mix = torch.randn(2, 8, 5), torch.randn(8, 5), torch.randn(2)
    decay, scale = 0.93, 8 ** -0.5
    fitted_form = hybrid_outputs(q, k, v, qw, kw, torch.tensor(decay).log(), mix, sink, window, scale)
    spec = Hybrid(sink=sink, window=window, decay=decay, feature_dim=10, weights="x")
    group = LayerKinds(0, (spec,), {"x.q": qw, "x.k": kw, "x.log_mix": mix}).groups[0]
    pos = torch.arange(48)[None]
    out, _ = group.run(q[None], k[None, None], v[None, None], pos, pos[:, None], None, scale)
    assert torch.allclose(fitted_form, out[0], atol=1e-5)
    rows = torch.tensor([0, 6, 30, 47])
    assert torch.allclose(hybrid_outputs(q, k, v, qw, kw, torch.tensor(decay).log(), mix, sink, window, scale, rows),
                          fitted_form[:, rows], atol=1e-6)


def test_hybrid_fit_beats_the_window_alone_and_learns_the_mix():
    """With the window in place, the fitted linear part lowers the error below the window-only head
    (the mix driven to 0 would leave exactly the window)."""
    train, held = qkv(T=64, seed=1), qkv(T=64, seed=2)
    scale = 0.1
    fitted = fit_head([train], [held], scale, feature_dim=16, steps=60, lr=0.05, window=8, sink=2)
    q, k, v = held
    window_only = hybrid_outputs(q, k, v, fitted.q_weight, fitted.k_weight, torch.tensor(-1.0),
                                 torch.full((2,), -50.0), 2, 8, scale)
    assert fitted.error < float(relative_error(window_only, softmax_outputs(q, k, v, scale)))
    assert fitted.log_mix.shape == (2,) and not torch.equal(fitted.log_mix, torch.zeros(2))


def test_fitting_lowers_the_error_on_held_out_text():
    """A smooth (low-temperature) softmax head is easy to imitate: the fit beats its starting point."""
    train, held = qkv(seed=1), qkv(seed=2)
    scale = 0.1
    start = fit_head([train], [held], scale, feature_dim=16, steps=0)
    fitted = fit_head([train], [held], scale, feature_dim=16, steps=60, lr=0.05)
    assert fitted.train_error < 0.5 * start.train_error
    assert fitted.error < start.error
    assert fitted.q_weight.shape == (2, 8, 8) and fitted.k_weight.shape == (8, 8) and 0 < fitted.decay < 1
    assert torch.isclose(relative_error(softmax_outputs(*held, scale), softmax_outputs(*held, scale)), torch.tensor(0.0))


def test_heads_are_chosen_by_error_under_the_budget():
    errors = {(0, 0): 0.5, (0, 1): 0.1, (1, 0): 0.3, (1, 1): 0.05}
    assert choose_heads(errors, 0.5, None, 4) == [(0, 1), (1, 1)]
    assert choose_heads(errors, None, 0.3, 4) == [(0, 1), (1, 0), (1, 1)]
    assert choose_heads(errors, 0.75, 0.2, 4) == [(0, 1), (1, 1)]
    assert choose_heads(errors, 0.0, None, 4) == []
    # a fraction is an upper bound: 0.6 of 4 heads allows 2, not round(2.4) or 3
    assert choose_heads(errors, 0.6, None, 4) == [(0, 1), (1, 1)]
    assert choose_heads({(0, 0): 0.2, (0, 1): 0.2, (1, 0): 0.1}, 0.67, None, 3) == [(0, 0), (1, 0)]   # ties by head


def test_fit_lightning_end_to_end_then_resume(tiny_dir, tmp_path, capsys):
    common = ["fit", "lightning", "--model", str(tiny_dir), "--plan", "dense", "--length", "32", "--samples", "1",
              "--steps", "3", "--feature-dim", "8", "--cache-dir", str(tmp_path / "work")]
    assert main(common + ["--heads", "auto", "--fraction", "0.5", "--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "4 candidate heads, 0 already fitted" in out and "converted 2 of 4 KV heads" in out
    plan = load_plan(tmp_path / "a.json")
    assert sum(isinstance(h, Lightning) for h in plan.heads) == 2
    assert plan.calibration["method"] == "lightning" and plan.calibration["command"].startswith("headwise fit lightning")
    lin = plan.calibration["fit"]
    assert len(lin["errors"]) == 4 and len(lin["heads"]) == 2
    chosen = sorted(lin["errors"], key=lin["errors"].get)[:2]
    assert sorted(lin["heads"]) == sorted(chosen)
    assert (tmp_path / "a.safetensors").exists()
    assert json.loads((tmp_path / "a.json").read_text())["weights"]["file"] == "a.safetensors"
    # a second run at another budget refits nothing and converts the listed heads
    assert main(common + ["--heads", "1.0", "--out", str(tmp_path / "b.json")]) == 0
    assert "1 candidate heads, 1 already fitted" in capsys.readouterr().out
    plan_b = load_plan(tmp_path / "b.json")
    assert isinstance(plan_b.layers[1][0], Lightning) and sum(isinstance(h, Lightning) for h in plan_b.heads) == 1


def test_replace_limits_the_candidates_to_base_kinds(tiny_dir, tmp_path, capsys):
    from headwise.plan import Plan
    from headwise.kinds.dense import Dense
    from headwise.kinds.window import Window

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    base = Plan.dense(model)
    Plan(base.model, ((Window(sink=2, alpha=8.0), Dense()), (Dense(), Window(sink=2, alpha=8.0)))).save(tmp_path / "w.json")
    args = ["fit", "lightning", "--model", str(tiny_dir), "--plan", str(tmp_path / "w.json"), "--length", "32",
            "--samples", "1", "--steps", "2", "--feature-dim", "8", "--cache-dir", str(tmp_path / "work"),
            "--replace", "window",
            "--fraction", "1.0", "--out", str(tmp_path / "m.json")]
    assert main(args) == 0
    assert "2 candidate heads" in capsys.readouterr().out
    plan = load_plan(tmp_path / "m.json")
    assert [[h.kind for h in layer] for layer in plan.layers] == [["lightning", "dense"], ["dense", "lightning"]]


def test_fit_hybrid_makes_hybrid_heads_with_window_and_sink(tiny_dir, tmp_path, capsys):
    from headwise.patches import patch_model

    common = ["--model", str(tiny_dir), "--plan", "dense", "--length", "32", "--samples", "1", "--steps", "3",
              "--feature-dim", "8", "--cache-dir", str(tmp_path / "work"), "--heads", "auto", "--fraction", "0.5"]
    args = ["fit", "hybrid", *common, "--window", "6", "--sink", "2", "--out", str(tmp_path / "h.json")]
    assert main(args) == 0
    assert "converted 2 of 4 KV heads to hybrid (sink 2, window 6)" in capsys.readouterr().out
    plan = load_plan(tmp_path / "h.json")
    hybrids = [h for h in plan.heads if isinstance(h, Hybrid)]
    assert len(hybrids) == 2 and all((h.sink, h.window) == (2, 6) for h in hybrids)
    assert plan.calibration["fit"]["window"] == 6 and plan.calibration["fit"]["sink"] == 2
    assert plan.calibration["method"] == "hybrid"
    assert all(plan.weights[f"{h.weights}.log_mix"].shape == (2,) for h in hybrids)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    patch_model(model, str(tmp_path / "h.json"))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(3, 43)[None]).logits).all()
    # lightning fits of the same heads live in another store: nothing is reused across kinds
    assert main(["fit", "lightning", *common, "--out", str(tmp_path / "l.json")]) == 0
    assert "4 candidate heads, 0 already fitted" in capsys.readouterr().out


def test_bad_head_list_is_refused(tiny_dir, tmp_path, capsys):
    assert main(["fit", "lightning", "--model", str(tiny_dir), "--plan", "dense", "--heads", "5.0",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "outside the model's 2 layers x 2 KV heads" in capsys.readouterr().err
    assert main(["fit", "hybrid", "--model", str(tiny_dir), "--plan", "dense", "--window", "0",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "--window must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("kind", [["lightning"], ["hybrid", "--window", "64", "--sink", "4"]], ids=["lightning", "hybrid"])
def test_real_model_linearized_plan_decodes_like_recomputation(real_model, tmp_path, kind):
    """Fit three heads of the embedded model briefly, then cached greedy decoding equals recomputation
    (a hybrid head's linear part is in use: 200 tokens > sink + window)."""
    from headwise.models import embedded_model_dir
    from headwise.patches import patch_model, unpatch_model

    model, tokenizer = real_model
    assert main(["fit", *kind, "--model", str(embedded_model_dir()), "--plan", "uniform:0.25", "--heads", "0.0,0.2,9.1",
                 "--length", "256", "--samples", "1", "--steps", "10", "--cache-dir", str(tmp_path / "w"),
                 "--out", str(tmp_path / "p.json")]) == 0
    import pydoc_data.topics as topics
    x = tokenizer(" ".join(topics.topics.values())[5000:20000], return_tensors="pt").input_ids[:, :200]
    patch_model(model, str(tmp_path / "p.json"))
    try:
        with torch.no_grad():
            out = model.generate(input_ids=x, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            for t in range(8):
                full = model(input_ids=out.sequences[:, : x.shape[1] + t], use_cache=False).logits[:, -1]
                assert torch.allclose(full, out.logits[t], atol=1e-3), f"step {t}"
    finally:
        unpatch_model(model)
