"""``headwise demo`` runs on the engine: a small passkey table with dense and the shipped d25 plan."""

from __future__ import annotations

from headwise.demo import DEFAULT_PLANS, format_table, run_passkey


def test_demo_compares_dense_uniform_and_the_shipped_plan_by_default():
    assert DEFAULT_PLANS == {"dense": "dense", "uniform 25%": "uniform:0.25", "calibrated 25%": "d25"}


def test_demo_table_on_the_engine(real_model):
    model, tokenizer = real_model
    runs = run_passkey(model, tokenizer, {"dense": "dense", "d25": "d25"}, [1024], [0.5], max_tokens=12)
    dense, d25 = runs
    assert (dense.plan, dense.length, dense.trials) == ("dense", 1024, 1)
    assert dense.correct == 1                                 # the model finds a 1k passkey
    assert abs(dense.kept_mb - dense.dense_mb) / dense.dense_mb < 0.05   # dense holds what dense holds
    assert d25.kept_mb < 0.5 * d25.dense_mb                   # d25 keeps about a third at 1k
    assert dense.prefill_s > 0 and dense.decode_ms > 0
    table = format_table(runs)
    assert table.count("\n") == 3 and "| d25 | 1024 |" in table
