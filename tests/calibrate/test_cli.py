"""End to end: ``headwise calibrate`` on a tiny random model with the embedded model's tokenizer,
resuming from cached profiles, then ``headwise plan show``; and the calibration samples."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headwise.cli import main
from headwise.plan import Plan, load_plan


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from headwise.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the real vocabulary, saved as a local checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_calibrate_then_resume_then_show(tiny_dir, tmp_path, capsys):
    # toy lengths: the default span floor (96 tokens from 256 on) leaves no 25% plan at 256 tokens, so scale it down
    args = ["calibrate", "--model", str(tiny_dir), "--lengths", "256,512", "--samples", "2", "--answer-tokens", "8",
            "--sink", "16", "--min-span", "32", "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    assert main(args + ["--density", "0.5", "--out", str(tmp_path / "a.json")]) == 0
    first = capsys.readouterr().out
    assert "4 of 4 samples to compute" in first
    plan = load_plan(tmp_path / "a.json")
    assert (tmp_path / "a.png").stat().st_size > 0
    cal = plan.calibration
    assert cal["density"] == 0.5 and cal["lengths"] == [256, 512] and cal["holdout_length"] == 512
    assert "calibrate" in cal["command"] and "pydoc_data" in cal["data"]["source"]
    for n in (256, 512):
        assert plan.density(n) <= 0.5
    for layer in plan.layers:
        assert len(set(layer)) <= 2

    # same inputs again: every profile comes from the cache and the plan is identical
    assert main(args + ["--density", "0.5", "--out", str(tmp_path / "b.json")]) == 0
    assert "0 of 4 samples to compute" in capsys.readouterr().out
    again = load_plan(tmp_path / "b.json")
    assert again.layers == plan.layers

    # another density re-solves from the same profile
    assert main(args + ["--density", "0.25", "--out", str(tmp_path / "c.json")]) == 0
    assert "0 of 4 samples to compute" in capsys.readouterr().out
    assert load_plan(tmp_path / "c.json").density(512) <= 0.25

    # a refit round profiles the same samples at the first plan and re-solves with both profiles
    assert main(args + ["--density", "0.5", "--refit", "1", "--out", str(tmp_path / "d.json")]) == 0
    assert "refit 1/1: profiling the samples at the plan (4 to compute)" in capsys.readouterr().out
    refitted = load_plan(tmp_path / "d.json")
    (refit,) = refitted.calibration["refits"]
    assert set(refit["mean_answer_loss_at_plan"]) == {"256", "512"}
    assert len(list((tmp_path / "cache").glob("*/at-*/L*-s*.npz"))) == 4
    for n in (256, 512):
        assert refitted.density(n) <= 0.5
    for layer in refitted.layers:
        assert len(set(layer)) <= 2
    assert main(args + ["--density", "0.5", "--refit", "1", "--out", str(tmp_path / "e.json")]) == 0
    assert "(0 to compute)" in capsys.readouterr().out
    assert load_plan(tmp_path / "e.json").layers == refitted.layers

    assert main(["plan", "show", str(tmp_path / "a.json"), "--png", str(tmp_path / "show.png")]) == 0
    shown = capsys.readouterr().out
    assert f"{plan.density(512):.4f}" in shown and (tmp_path / "show.png").stat().st_size > 0


def test_samples_are_exact_length_with_the_models_own_answer(tiny_dir, tokenizer):
    from headwise.data.calibration import INSTRUCTIONS, RECALL_FACTS, SampleBuilder

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    builder = SampleBuilder(model, tokenizer, answer_tokens=6, seed=1)
    offsets = builder.offsets(300, 4)
    assert offsets == SampleBuilder(model, tokenizer, answer_tokens=6, seed=1).offsets(300, 4)
    compared = 0
    for i, end in enumerate(offsets):
        sample = builder.build(300, i, end)
        ids = sample.input_ids
        assert ids.shape == (1, 300)
        assert 300 - 6 <= sample.answer_start < 300
        prompt = ids[:, :sample.answer_start]
        text = tokenizer.decode(prompt[0])
        if i % 2:      # summary: an instruction about the whole passage, no inserted facts
            assert INSTRUCTIONS[(i // 2) % len(INSTRUCTIONS)] in text and not sample.facts
        else:          # recall: every fact inside the passage, the asked one's answer start ends the prompt
            assert len(sample.facts) == RECALL_FACTS
            assert all(fact in text for _, fact in sample.facts)
            asked = sample.facts[0][1]
            assert asked.split(" folder")[0].split()[-1] in sample.instruction
            assert text.endswith(sample.answer_prefix) and sample.answer_prefix
            assert text.index(asked) < text.index(sample.instruction)
        # the target is the model's own greedy continuation of the prompt
        with torch.no_grad():
            greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=300 - sample.answer_start, pad_token_id=tokenizer.pad_token_id)
        answer_len = 300 - sample.answer_start
        if answer_len == 6:        # no early end: the answer is exactly the greedy continuation
            assert torch.equal(greedy[0, sample.answer_start:], ids[0, sample.answer_start:])
            compared += 1
    assert compared > 0


def test_plan_show_on_a_uniform_plan(tmp_path, capsys):
    from tests.conftest import make_tiny

    plan = Plan.uniform(make_tiny("llama"), 0.25)
    plan.save(tmp_path / "u.json")
    assert main(["plan", "show", str(tmp_path / "u.json"), "--lengths", "1024,4096"]) == 0
    out = capsys.readouterr().out
    assert "1024   0.2500" in out and "4096   0.2500" in out
    assert (tmp_path / "u.png").is_file()
    assert json.loads((tmp_path / "u.json").read_text())["calibration"]["method"] == "uniform"
    assert np.isclose(plan.density(4096), 0.25)


def test_calibrate_with_gates_then_resolve_from_cached_gates(tiny_dir, tmp_path, capsys):
    args = ["calibrate", "--model", str(tiny_dir), "--method", "gates", "--lengths", "256,512", "--samples", "2",
            "--answer-tokens", "8", "--sink", "16", "--gate-lengths", "512", "--gate-samples", "1",
            "--gate-steps", "2", "--gate-facts", "2", "--gate-window", "32", "--min-span", "32",
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    assert main(args + ["--density", "0.5", "--out", str(tmp_path / "a.json"), "--prefill", "dense"]) == 0
    assert "gates trained" in capsys.readouterr().out
    plan = load_plan(tmp_path / "a.json")
    notes = plan.calibration["long_heads"]
    assert plan.calibration["method"] == "gates+milp" and plan.prefill == "dense"
    assert notes["count"] == min(notes["wanted"], notes["cap"])
    dense = {(l, h) for l, layer in enumerate(plan.layers) for h, head in enumerate(layer) if head.kind == "dense"}
    assert {tuple(x) for x in notes["heads"]} <= dense
    for n in (256, 512):
        assert plan.density(n) <= 0.5 + 1e-9
    assert main(args + ["--density", "0.25", "--out", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "gates loaded" in out and "0 of 4 samples to compute" in out
    # a density sweep re-solves with the gates a plan records, without training them again
    assert main(args + ["--density", "0.75", "--gates-from", str(tmp_path / "a.json"),
                        "--out", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "gates taken from" in out and "gates trained" not in out and "gates loaded" not in out
    swept = load_plan(tmp_path / "c.json").calibration["long_heads"]
    assert swept["gates"] == notes["gates"] and swept["gates_from"] == str(tmp_path / "a.json")
    ranked = swept["heads"]
    assert ranked == notes["heads"][:len(ranked)] or notes["heads"] == ranked[:len(notes["heads"])]
    # approach iii: the next-ranked heads keep a long elastic span instead of a short window
    assert main(args + ["--density", "0.5", "--gates-from", str(tmp_path / "a.json"), "--long-heads", "1",
                        "--elastic-heads", "2", "--elastic-share", "0.4", "--out", str(tmp_path / "e.json")]) == 0
    assert "the next 2 elastic (>= 0.4 of N)" in capsys.readouterr().out
    elastic = load_plan(tmp_path / "e.json")
    chosen = elastic.calibration["elastic_heads"]
    gates = np.asarray(elastic.calibration["long_heads"]["gates"])
    long_set = {tuple(x) for x in elastic.calibration["long_heads"]["heads"]}
    picked = {tuple(x) for x in chosen["heads"]}
    rest = [gates[l, h] for l in range(gates.shape[0]) for h in range(gates.shape[1]) if (l, h) not in long_set | picked]
    assert chosen["count"] == 2 and not picked & long_set and min(gates[l, h] for l, h in picked) >= max(rest)
    assert all(elastic.layers[l][h].kept(n) >= 0.4 * n for l, h in chosen["heads"] for n in (512,))
    assert main(args + ["--density", "0.5", "--elastic-heads", "2", "--method", "profile",
                        "--out", str(tmp_path / "f.json")]) == 2
    assert "add --method gates" in capsys.readouterr().err
    # --windows even: the top-ranked heads dense, every other head the same window, and no profile computed
    assert main(args + ["--density", "0.5", "--gates-from", str(tmp_path / "a.json"), "--long-heads", "1",
                        "--windows", "even", "--out", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert "samples to compute" not in out and "every other head keeps 0.4000 of N" in out
    even = load_plan(tmp_path / "g.json")
    (top,) = even.calibration["long_heads"]["heads"]
    assert top == notes["heads"][0] and even.layers[top[0]][top[1]].kind == "dense"
    assert len({head for layer in even.layers for head in layer if head.kind == "window"}) == 1
    assert even.calibration["method"] == "gates+even" and abs(even.density(512) - 0.5) <= 0.005
    assert (tmp_path / "g.png").stat().st_size > 0
    assert main(args + ["--density", "0.5", "--windows", "even", "--out", str(tmp_path / "h.json")]
                + ["--method", "profile"]) == 2
    assert "--windows even keeps the heads ranked" in capsys.readouterr().err
    data = json.loads((tmp_path / "a.json").read_text())
    del data["calibration"]["long_heads"]
    (tmp_path / "plain.json").write_text(json.dumps(data))
    assert main(args + ["--density", "0.5", "--gates-from", str(tmp_path / "plain.json"),
                        "--out", str(tmp_path / "d.json")]) == 2
    assert "records no gates" in capsys.readouterr().err


@pytest.mark.slow
def test_select_keeps_the_split_with_the_lowest_validation_score(tiny_dir, tmp_path, capsys):
    """Approach ii: one plan per LONG:ELASTIC split, each scored on held-out samples; the lowest wins."""
    args = ["calibrate", "--model", str(tiny_dir), "--method", "gates", "--lengths", "256,512", "--samples", "2",
            "--answer-tokens", "8", "--sink", "16", "--gate-lengths", "512", "--gate-samples", "1",
            "--gate-steps", "2", "--gate-facts", "2", "--gate-window", "32", "--min-span", "32", "--prefill", "dense",
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--density", "0.5"]
    assert main(args + ["--select", "2:0,0:2,6:0", "--validation-samples", "2", "--out", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "--select chose" in out
    plan = load_plan(tmp_path / "s.json")
    selection = plan.calibration["selection"]
    rows = selection["rows"]
    assert [(r["elastic"]) for r in rows] == [0, 2, 0] and selection["validation"]["length"] == 512
    assert selection["validation"]["items"] == {"recall": 1, "summary": 1, "prose": 1}
    feasible = [r for r in rows if r["feasible"]]
    assert feasible and all({"score", "recall", "summary", "prose"} <= set(r) for r in feasible)
    chosen = rows[selection["chosen"]]
    assert chosen["score"] == min(r["score"] for r in feasible)
    assert plan.calibration["long_heads"]["count"] == chosen["long"] and plan.prefill == "dense"
    assert main(args + ["--select", "2-0", "--out", str(tmp_path / "t.json")]) == 2
    assert "LONG:ELASTIC pairs" in capsys.readouterr().err


def test_validation_score_of_dense_is_zero_and_of_a_small_window_is_not(tiny_dir, tokenizer):
    from headwise.calibrate.validate import build_validation, validation_score
    from headwise.plan import Plan

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    validation = build_validation(model, tokenizer, 384, 2, answer_tokens=8)
    assert [i.kind for i in validation.items] == ["recall", "summary", "prose"]
    dense = Plan.dense(model)
    score = validation_score(model, dataclasses.replace(dense, prefill="dense"), validation)
    assert abs(score["score"]) < 1e-4 and abs(score["prose"]) < 1e-4
    small = Plan.uniform(model, 0.05, sink=4)
    assert validation_score(model, dataclasses.replace(small, prefill="dense"), validation)["score"] > 1e-3


def test_calibrate_a_qwen2_shaped_model_keeps_the_budget_up_to_its_own_context(tokenizer, tmp_path, capsys):
    """Nothing assumes SmolLM2: a Qwen2-shaped model with a 4096-token context gets its budget lengths
    from that context (512 .. 4096) and keeps 25% +- 1% of KV at each, with floored elastic windows."""
    from transformers import Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=4096,
                         initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path / "qwen2"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert main(["calibrate", "--model", str(path), "--lengths", "256,512", "--samples", "2", "--answer-tokens", "8",
                 "--sink", "16", "--min-span", "32", "--density", "0.25", "--cache-dir", str(tmp_path / "cache"),
                 "--threads", "1", "--out", str(tmp_path / "q.json")]) == 0
    assert "N=  4096: density" in capsys.readouterr().out
    plan = load_plan(tmp_path / "q.json")
    budget = plan.calibration["budget"]
    assert budget["lengths"] == [256, 512, 1024, 2048, 4096] and budget["strict_from"] == 512
    assert plan.calibration["span_floor"] == "clamp" and "--lengths 256,512" in plan.calibration["command"]
    for n in (512, 1024, 2048, 4096):
        assert abs(plan.density(n) / 0.25 - 1) <= 0.01 + 1e-9, f"kept {plan.density(n):.4f} at N={n}"
    windows = [h for layer in plan.layers for h in layer if not h.keeps_everything]
    assert windows and all(h.min_span == 32 and h.span(40) >= 32 for h in windows)
