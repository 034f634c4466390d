"""``headwise fit softplus`` (``headwise.kinds.softplus.fit``): per-head entropy statistics, power
choice, and the plan picked by the calibration loss beyond the trained length (tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from headwise import patch_model, unpatch_model
from headwise.kinds.softplus import fit as softplus_fit
from headwise.kinds.softplus import Softplus
from headwise.kinds.dense import Dense
from tests.engine.conftest import make_long_tiny

pytestmark = pytest.mark.usefixtures("no_grad")


def test_reweighted_entropy_sharpens_and_keeps_uniform_rows():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    n = torch.tensor([4.0, 4.0])
    plain = softplus_fit.reweighted_entropy(probs, n, 0.0)
    assert torch.allclose(plain[1], torch.tensor(math.log(4.0)))
    sharp = softplus_fit.reweighted_entropy(probs, n, 3.0)
    assert sharp[0] < plain[0] and torch.allclose(sharp[1], plain[1])     # uniform: nothing above 1/n, kept


def test_choose_powers_matches_inside_entropy():
    stats = [[softplus_fit.HeadStats({0.0: 2.0, 1.0: 1.9, 3.0: 1.5}, {0.0: 3.0, 1.0: 2.6, 3.0: 2.1}),
              softplus_fit.HeadStats({0.0: 2.0, 1.0: 1.0, 3.0: 0.5}, {0.0: 2.05, 1.0: 1.2, 3.0: 0.6})]]
    (p0, g0), (p1, g1) = softplus_fit.choose_powers(stats)[0]
    assert p0 == 3.0 and g0 == pytest.approx(1.0 - 0.1 - 0.5)                # gap 1.0 closed to 0.1, inside moved 0.5
    assert p1 == 0.0 and g1 == 0.0                                           # already invariant: left dense


def test_fit_picks_the_candidate_with_the_lowest_loss_beyond_the_trained_length(monkeypatch):
    model = make_long_tiny(seed=1, max_positions=1024)
    ids = torch.randint(3, 128, (1, 160), generator=torch.Generator().manual_seed(0))
    logs = []
    real = softplus_fit.choose_powers

    def with_gains(stats):                 # a random tiny model gains nothing: give two heads a gain
        chosen = real(stats)
        chosen[0][1], chosen[1][0] = (3.0, 0.5), (1.0, 0.2)
        return chosen

    monkeypatch.setattr(softplus_fit, "choose_powers", with_gains)
    plan = softplus_fit.fit(model, ids, trained=96, powers=(1.0, 3.0), fractions=(0.25, 1.0), rows=8, log=logs.append)
    cal = plan.calibration
    assert cal["method"] == "softplus_fit" and cal["picked"] in cal["loss_beyond"]
    assert set(cal["loss_beyond"]) == {"dense", "top0.25", "top1"} and len(cal["heads"]) == 2
    assert [h["power"] for h in cal["heads"][0]] [1] == 3.0
    assert cal["loss_beyond"][cal["picked"]] == min(cal["loss_beyond"].values())
    for layer, heads in zip(plan.layers, cal["heads"]):
        for spec, head in zip(layer, heads):
            assert isinstance(spec, Dense) or (isinstance(spec, Softplus) and spec.power == head["power"] > 0)
    dense = softplus_fit.token_losses(model, ids)                              # the recorded losses are real
    assert cal["loss_beyond"]["dense"] == pytest.approx(float(dense[95:].mean()), abs=1e-5)
    top1 = softplus_fit.plan_for(model, with_gains(softplus_fit.StatsCollector(2, 2, torch.zeros(1), torch.zeros(1),
                                                                               (1.0, 3.0)).stats()), 1.0, 96)[0]
    assert [type(h).__name__ for layer in top1.layers for h in layer] == ["Dense", "Softplus", "Softplus", "Dense"]
    patch_model(model, top1)
    loss = softplus_fit.token_losses(model, ids)
    unpatch_model(model)
    assert cal["loss_beyond"]["top1"] == pytest.approx(float(loss[95:].mean()), abs=1e-5)
    assert model.config._attn_implementation == "sdpa"
    assert any("statistics pass" in line for line in logs)


def test_calibration_text_must_pass_the_trained_length():
    model = make_long_tiny()
    with pytest.raises(ValueError, match="must be longer than the trained context of 96"):
        softplus_fit.fit(model, torch.ones(1, 90, dtype=torch.long), trained=96)


def test_fit_softplus_command_writes_a_plan_with_its_command(tiny_dir, tmp_path, capsys):
    from headwise.cli import main
    from headwise.plan import load_plan

    out = tmp_path / "s.json"
    args = ["fit", "softplus", "--model", str(tiny_dir), "--trained", "96", "--length", "160", "--offset", "100",
            "--powers", "1,3", "--fractions", "0.5", "--rows", "8", "--out", str(out)]
    assert main(args) == 0
    assert "softplus heads" in capsys.readouterr().out
    cal = load_plan(out).calibration
    assert cal["command"] == "headwise fit softplus " + " ".join(args[2:])
    assert cal["data"] == {"source": "pydoc_data.topics (CPython reference prose)", "offset": 100, "length": 160}
    assert cal["length"] == 160 and cal["trained_length"] == 96
    assert main(["fit", "softplus", "--model", str(tiny_dir), "--trained", "96", "--offset", "10000000",
                 "--out", str(out)]) == 2
    assert "outside the corpus" in capsys.readouterr().err
