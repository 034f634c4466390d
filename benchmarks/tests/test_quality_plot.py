"""benchmarks/quality_plot.py: the points it draws come from the quality JSON (KV kept per plan and
length, perplexity relative to dense, retrieval as a share), and it writes a PNG."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality_plot as plot


def quality_json(path, kept_d25=0.25):
    results = [
        {"row": "dense", "task": "perplexity", "length": 2048, "value": 10.0},
        {"row": "dense", "task": "passkey", "length": 2048, "value": [10, 10]},
        {"row": "uniform 0.25 | dense", "task": "perplexity", "length": 2048, "value": 11.0},
        {"row": "uniform 0.25 | dense", "task": "passkey", "length": 2048, "value": [2, 10]},
        {"row": "d25 | dense", "task": "perplexity", "length": 2048, "value": 10.5},
        {"row": "d25 | dense", "task": "passkey", "length": 2048, "value": [9, 10]},
        {"row": "d50 | dense", "task": "perplexity", "length": 2048, "value": 10.1},
    ]
    kept = {"uniform 0.25": {"2048": 0.25}, "d25": {"2048": kept_d25}, "d50": {"2048": 0.5}}
    path.write_text(json.dumps({"results": results, "kv_kept": kept}))
    return path


def test_points_are_relative_perplexity_and_shares(tmp_path):
    values, kept = plot.load_results([quality_json(tmp_path / "q.json", kept_d25=0.252)])
    series = plot.parse_series([], kept)
    assert series == {"uniform sink + window": ["uniform 0.25"], "calibrated": ["d25", "d50"]}
    ppl = plot.series_points(values, kept, series["calibrated"], "dense", "perplexity", 2048)
    assert ppl == [(0.252, pytest.approx(5.0)), (0.5, pytest.approx(1.0))]
    assert plot.series_points(values, kept, ["d25", "d50"], "dense", "passkey", 2048) == [(0.252, 0.9)]
    assert plot.series_points(values, kept, ["uniform 0.25"], "dense", "passkey", 2048) == [(0.25, 0.2)]


def test_writes_a_png_and_refuses_unknown_plans(tmp_path):
    values, kept = plot.load_results([quality_json(tmp_path / "q.json")])
    out = tmp_path / "q.png"
    plot.draw(values, kept, plot.parse_series(["v3=d25,d50", "uniform=uniform 0.25"], kept), "dense", out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="does not hold: d15"):
        plot.parse_series(["v3=d15,d25"], kept)
    with pytest.raises(SystemExit, match="no 'kv_kept' field"):
        (tmp_path / "old.json").write_text(json.dumps({"results": []}))
        plot.load_results([tmp_path / "old.json"])
