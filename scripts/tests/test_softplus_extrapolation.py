"""scripts/softplus_extrapolation.py on a tiny model: named configurations, passkey trials measured in
parts at the depths of the whole run, perplexity bands, and the table."""

from __future__ import annotations

import json

import pytest

from benchmarks.tests.conftest import tiny_llama_with_real_tokenizer
from headwise import patch_model
from headwise.eval.tasks import sweep_depths
from headwise.kinds.softplus import Softplus
from scripts import softplus_extrapolation


@pytest.fixture(scope="module")
def script():
    return softplus_extrapolation


@pytest.fixture
def tiny_run(script, monkeypatch):
    model, tok = tiny_llama_with_real_tokenizer()

    def load(config):
        plan = script.named_plan(config, model)
        if plan is not None:
            patch_model(model, plan)
        return model, tok, plan

    monkeypatch.setattr(script, "load", load)
    return script, model


def test_named_configurations_put_the_rule_on_every_head(script, tiny_run):
    _, model = tiny_run
    assert script.named_plan("dense", model) is None
    lssar = script.named_plan("lssar-all-p15", model)
    assert {h for layer in lssar.layers for h in layer} == {
        Softplus(nonlinearity="softplus", scale="log", scale_length=8192, power=15.0)}
    assert script.named_plan("reweight-all-p3", model).layers[1][0] == Softplus(
        nonlinearity="exp", scale="none", scale_length=8192, power=3.0)
    with pytest.raises(SystemExit, match="unknown config 'lssar'"):
        script.named_plan("lssar", model)


def test_passkey_in_parts_keeps_the_depths_of_the_whole_run(tiny_run, tmp_path, capsys):
    script, _ = tiny_run
    out = tmp_path / "r.jsonl"
    common = ["passkey", "--config", "dense", "--length", "256", "--trials", "4", "--new-tokens", "2", "--out", str(out)]
    script.main(common + ["--limit", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["trial"] for r in rows] == [0, 1, 2]
    script.main(common)                                                   # resumes: only trial 3 is run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert [r["depth"] for r in rows] == pytest.approx(sweep_depths(4))
    assert all(r["new_tokens"] == 2 and r["tokens"] <= 256 for r in rows)
    script.main(["ppl", "--config", "dense", "--length", "300", "--docs", "1", "--out", str(out)])
    ppl = json.loads(out.read_text().splitlines()[-1])
    assert sum(ppl["counts"]) == ppl["tokens"] - 1 and len(ppl["nll_sums"]) == 1
    capsys.readouterr()
    script.main(["table", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| dense | 1 |" in table and f"{sum(r['correct'] for r in rows)}/4" in table
