"""Report files from a synthetic comparison (no model)."""

from __future__ import annotations

import json

from headwise.eval.report import write_report
from headwise.eval.runner import plan_label, run_name


def test_report_files_and_table(tmp_path):
    results = {
        "dense": {"headwise_passkey_2048": {"contains,none": 1.0}, "headwise_passkey_4096": {"contains,none": 0.5},
                  "headwise_perplexity_2048": {"word_perplexity,none": 20.0},
                  "headwise_perplexity_4096": {"word_perplexity,none": 19.0}},
        "uniform 25%": {"headwise_passkey_2048": {"contains,none": 0.0}, "headwise_passkey_4096": {"contains,none": 0.0},
                        "headwise_perplexity_2048": {"word_perplexity,none": 30.0},
                        "headwise_perplexity_4096": {"word_perplexity,none": 31.5}},
    }
    config = {"tasks": ["passkey", "perplexity"], "lengths": [2048, 4096], "trials": {"passkey": 2, "perplexity": 1}}
    table = write_report(tmp_path, config, results, {"dense": 60.0, "uniform 25%": 90.0})
    assert "| dense | passkey (2 trials) | 100% | 50% |" in table
    assert "| uniform 25% | perplexity (word ppl, 1 docs) | 30.00 | 31.50 |" in table
    for name in ("config.json", "results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"]["dense"]["passkey"]["4096"] == 0.5


def test_run_name_states_the_config():
    plans = {plan_label(s): s for s in ["dense", "uniform:0.25", "plans/my-plan.json"]}
    assert list(plans) == ["dense", "uniform 25%", "my-plan"]
    name = run_name("SmolLM2-135M-Instruct", plans, ["passkey", "kv"], [2048, 8192], {"passkey": 2, "kv": 1}, 0)
    assert name == "eval_SmolLM2-135M-Instruct_dense+uniform25+my-plan_2k-8k_passkey+kv_trials1-2_seed0"
