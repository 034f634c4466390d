"""Retrieval-head scores (``--method retrieval``): the attention arithmetic against an explicit
softmax, the planted retrieval head ranked first, the recall samples' copy sources, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headwise.calibrate.retrieval import RetrievalScores, copy_attention, retrieval_scores
from headwise.cli import main
from headwise.data.recall import RecallBuilder, RecallSample
from headwise.plan import load_plan
from tests.calibrate.test_cli import tiny_dir, tokenizer  # noqa: F401  (fixtures)
from tests.calibrate.test_gates import T, planted_model, planted_sequences


@pytest.mark.parametrize("H,Hkv,T_,P", [(4, 2, 40, 5), (6, 1, 17, 3), (3, 3, 64, 8)],
                         ids=lambda v: str(v))
def test_copy_attention_matches_an_explicit_softmax(H, Hkv, T_, P):
    g = torch.Generator().manual_seed(H * 100 + T_)
    q, k = torch.randn(H, T_, 8, generator=g), torch.randn(Hkv, T_, 8, generator=g)
    positions = torch.randint(4, T_, (P,), generator=g)
    sources = torch.stack([torch.randint(0, int(p) + 1, (1,), generator=g)[0] for p in positions])
    entries = torch.stack([torch.clamp(sources - 2, min=0), torch.minimum(sources + 3, positions + 1)], -1)
    entry, copy, top1 = copy_attention(q, k, positions, sources, entries, 0.3)
    group = H // Hkv
    for kv in range(Hkv):
        for i, p in enumerate(positions.tolist()):
            rows = []
            for h in range(kv * group, (kv + 1) * group):
                w = torch.softmax(q[h, p] @ k[kv, :p + 1].T * 0.3, -1)
                s, (a, b) = int(sources[i]), entries[i].tolist()
                rows.append((float(w[a:b].sum()), float(w[s]), float(w.argmax() == s)))
            want = np.max(np.array(rows), axis=0)
            np.testing.assert_allclose([entry[kv, i], copy[kv, i], top1[kv, i]], want, atol=1e-5)


def planted_recall_samples(count=4, seed=0):
    """The gates' planted data as recall samples: the query at the end copies the one value token."""
    return [RecallSample(ids, torch.tensor([T - 1]), (at / T,), torch.tensor([at]), torch.tensor([[at - 1, at + 1]]))
            for ids, at in planted_sequences(count, seed)]


def test_the_planted_retrieval_head_ranks_first():
    model = planted_model()
    scores = retrieval_scores(model, planted_recall_samples())
    assert scores.positions == 4
    assert scores.copy_mass[0, 0] > 0.5 and scores.copy_mass[0, 1] < 0.05, scores.copy_mass
    assert scores.top1[0, 0] == 1.0 and scores.top1[0, 1] == 0.0
    assert scores.entry_mass[0, 0] >= scores.copy_mass[0, 0]
    for score in ("entry", "copy"):
        assert scores.ranking(score) == [(0, 0), (0, 1)]
    assert model.config._attn_implementation == "sdpa"          # observing is undone


def test_ranking_refuses_an_unknown_score():
    scores = RetrievalScores(*(np.zeros((1, 2)) for _ in range(3)), positions=1)
    with pytest.raises(ValueError, match="entry, copy"):
        scores.ranking("mass")


def test_samples_with_no_known_source_are_refused():
    sample = planted_recall_samples(1)[0]
    sample = RecallSample(sample.input_ids, sample.positions, sample.depths, torch.tensor([-1]), sample.entries)
    with pytest.raises(ValueError, match="known source"):
        retrieval_scores(planted_model(), [sample])


@pytest.mark.parametrize("length", [512, 2048])
def test_recall_sources_point_at_the_copied_value_inside_its_entry(tokenizer, length):  # noqa: F811
    sample = RecallBuilder(tokenizer, facts=4, seed=3).build(length, 1)
    ids, positions, sources = sample.input_ids[0], sample.positions, sample.sources
    assert len(sources) == len(positions) and (sources >= 0).all()
    assert (ids[sources] == ids[positions + 1]).all()                 # the token each position predicts
    start, end = sample.entries[:, 0], sample.entries[:, 1]
    assert ((start <= sources) & (sources < end) & (end <= positions.min())).all()
    text = tokenizer.decode(ids[start[0]:end[0]])
    assert text.startswith("Ledger entry:") and "grams." in text


def test_calibrate_with_retrieval_scores(tiny_dir, tmp_path, capsys):  # noqa: F811
    args = ["calibrate", "--model", str(tiny_dir), "--method", "retrieval", "--lengths", "256,512", "--samples", "2",
            "--answer-tokens", "8", "--sink", "16", "--gate-lengths", "512", "--gate-samples", "1",
            "--gate-facts", "2", "--min-span", "32", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--density", "0.5"]
    assert main(args + ["--out", str(tmp_path / "none.json")]) == 2
    assert "needs --long-heads" in capsys.readouterr().err
    assert main(args + ["--long-heads", "1", "--elastic-heads", "1", "--out", str(tmp_path / "a.json")]) == 0
    assert "retrieval scores computed" in capsys.readouterr().out
    plan = load_plan(tmp_path / "a.json")
    notes = plan.calibration["long_heads"]
    assert notes["method"].startswith("retrieval heads") and notes["count"] == 1 and notes["positions"] > 0
    mass = np.asarray(notes["entry_mass"])
    (l, h), = notes["heads"]
    (el, eh), = plan.calibration["elastic_heads"]["heads"]
    assert plan.layers[l][h].kind == "dense" and mass[l, h] >= mass[el, eh] >= np.sort(mass.ravel())[-2]
    assert main(args + ["--long-heads", "2", "--retrieval-score", "copy", "--out", str(tmp_path / "b.json")]) == 0
    assert "retrieval scores loaded" in capsys.readouterr().out
    assert load_plan(tmp_path / "b.json").calibration["long_heads"]["score"] == "copy"
    assert main(args + ["--long-heads", "1", "--gates-from", str(tmp_path / "a.json"),
                        "--out", str(tmp_path / "c.json")]) == 2
    assert "--gates-from takes recorded gates" in capsys.readouterr().err
