"""The decode benchmark's code paths on a tiny random model (no timings asserted, no vLLM)."""

from __future__ import annotations

import pytest

from benchmarks import decode as bench
from benchmarks.common import Setting, kv_bytes_per_token, parse_settings, weight_bytes
from tests.conftest import make_tiny

SETTING = Setting(64, 2)
STEPS = 4


def engine_available() -> bool:
    try:
        from headwise.engine import LLM, SamplingParams  # noqa: F401
    except ImportError:
        return False
    return True


def test_parse_settings_and_rows():
    assert parse_settings("4096x4, 8192x8") == [Setting(4096, 4), Setting(8192, 8)]
    with pytest.raises(SystemExit):
        parse_settings("4096")
    assert "vllm" not in bench.parse_rows(None, skip_vllm=True)
    assert bench.parse_rows("hf,engine-d25") == ["hf", "engine-d25"]
    with pytest.raises(SystemExit):
        bench.parse_rows("hf,nope")


def test_bytes_model():
    from headwise.plan import Plan

    model = make_tiny()
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 2 * 2 * 16 * 4                      # K+V, layers, kv heads, head_dim, fp32
    dense = bench.kv_read_per_step(Plan.dense(model), SETTING, STEPS, model)
    assert dense == pytest.approx(SETTING.batch * per_token * (SETTING.context + (STEPS + 1) / 2))
    window = bench.kv_read_per_step(Plan.uniform(model, 0.25, sink=4), Setting(512, 2), STEPS, model)
    assert window < 0.3 * bench.kv_read_per_step(Plan.dense(model), Setting(512, 2), STEPS, model)
    tied = sum(p.numel() for p in model.parameters()) * 4
    assert weight_bytes(model) == tied


def test_rows_on_tiny_model(capsys):
    rows = ["hf", "generate_batch", "engine-dense", "engine-uniform25"]
    results = bench.run_setting(SETTING, rows, STEPS, lambda: (make_tiny(), None), model_dir=None, threads=1)
    by = {r.key: r for r in results}
    hf, gb = by["hf"], by["generate_batch"]
    assert hf.error is None and gb.error is None, (hf.error, gb.error)
    for r in (hf, gb):
        assert r.prefill_s > 0 and r.decode_tok_s > 0 and r.kv_held_bytes > 0
        assert len(r.tokens) == SETTING.batch and all(len(t) == STEPS + 1 for t in r.tokens)
    assert gb.tokens == hf.tokens                                 # both greedy dense on the same prompts
    assert hf.kv_held_bytes == SETTING.batch * (SETTING.context + STEPS) * kv_bytes_per_token(make_tiny())
    for key in ("engine-dense", "engine-uniform25"):
        if engine_available():
            assert by[key].error is None, by[key].error
            assert [t[: STEPS + 1] for t in by["engine-dense"].tokens] == hf.tokens
            assert by[key].decode_steps >= 1 and by[key].decode_tokens == by[key].decode_steps * SETTING.batch
        else:
            assert "engine" in by[key].error
    machine = {"read_gbps": 10.0}
    table = bench.format_table(results, machine, [SETTING])
    assert table.count("\n") == 1 + len(rows)
    checks = bench.target_checks(results, [SETTING], machine["read_gbps"])
    assert all(c.line().startswith("- ") for c in checks)
    assert all(c.met is None for c in checks if "vLLM" in c.name)
    lines = bench.check_lines(checks)                   # no vLLM row: its checks are counted, not listed
    unmeasured = [c for c in checks if c.measured is None and not c.note]
    assert unmeasured
    assert lines[-1] == f"- {len(unmeasured)} more checks not measured: their rows were not run or failed"
    assert len(lines) == len(checks) - len(unmeasured) + 1


def test_machine_measure():
    m = bench.measure_machine(gib=0.01, repeats=2)
    assert m["read_gbps"] > 0 and m["matmul_gflops"] > 0 and m["copy_gbps"] > 0


def test_hf_plan_rows_run_a_plan_through_patch_model():
    """``--hf-plan NAME=SPEC`` runs the plan through ``patch_model``: a dense plan gives the unpatched
    tokens, a window plan holds less KV, and the model is unpatched after the row."""
    from headwise.patches import is_patched

    rows = bench.parse_plan_rows(["d=dense", "u=uniform:0.25:4"], prefix="hf-", flag="--hf-plan")
    assert rows == {"hf-d": "dense", "hf-u": "uniform:0.25:4"}
    model = make_tiny()
    results = bench.run_setting(SETTING, ["hf", *rows], STEPS, lambda: (model, None), model_dir=None, threads=1,
                                plan_specs=rows)
    by = {r.key: r for r in results}
    assert all(r.error is None for r in results), [r.error for r in results]
    assert by["hf-d"].label == "HF patched, d" and by["hf-d"].tokens == by["hf"].tokens
    assert by["hf-u"].kv_held_bytes < 0.5 * by["hf"].kv_held_bytes
    assert by["hf-u"].extra["state_bytes"] == 0 and not is_patched(model)


def test_plan_rows_run_any_plan_in_the_engine(tmp_path):
    """``--plan NAME=SPEC`` adds an engine row; here a plan with hybrid heads (KV ring + recurrent state)."""
    from tests.kinds.test_hybrid import hybrid_plan

    assert bench.parse_plan_rows(["mine=/x.json", "u=uniform:0.25"]) == {"engine-mine": "/x.json",
                                                                        "engine-u": "uniform:0.25"}
    for bad in (["nope"], ["=x.json"], ["d25=x.json"]):
        with pytest.raises(SystemExit, match="NAME=SPEC|already a row"):
            bench.parse_plan_rows(bad)
    hybrid_plan(make_tiny()).save(tmp_path / "h.json")
    results = bench.run_setting(SETTING, ["engine-dense", "engine-hybrid"], STEPS, lambda: (make_tiny(), None),
                                model_dir=None, threads=1, plan_specs={"engine-hybrid": str(tmp_path / "h.json")})
    row = {r.key: r for r in results}["engine-hybrid"]
    if not engine_available():
        assert "engine" in row.error
        return
    assert row.error is None, row.error
    assert row.label == "headwise engine, hybrid" and row.decode_tok_s > 0
    assert row.kv_held_bytes < {r.key: r for r in results}["engine-dense"].kv_held_bytes


def test_decode_rows_table_has_every_setting_and_ratios_within_a_setting():
    from benchmarks.decode_rows import table

    def row(setting, rate):
        return {"setting": setting, "prefill_s": 1.0, "decode_tok_s": rate, "step_s": 0.1, "bytes_per_step": 1e8,
                "achieved_gbps": 1.0}
    machine = {"read_gbps": 20.0}
    done = [("vllm", "vllm", "float32", {"machine": machine, "rows": [row("4096x4", 40.0), row("8192x8", 30.0)]}),
            ("after", "engine-d25", "float32", {"machine": machine, "rows": [row("4096x4", 100.0),
                                                                             row("8192x8", 90.0)]})]
    text = table(done)
    assert "| after | engine-d25 | float32 | 4096x4 |" in text and "| 2.50x |" in text and "| 3.00x |" in text


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.real_model
def test_vllm_and_engine_rows_time_full_batch_decode_steps(tmp_path):
    """The vLLM row (its worker process) and an engine row on the embedded model: both decode rates come
    from steps in which every request decoded, and their greedy tokens agree."""
    import json
    import subprocess
    import sys

    from benchmarks.common import REPO

    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "decode.py"), "--settings", "600x3", "--decode-tokens", "6",
           "--rows", "vllm,engine-dense", "--threads", "2", "--json", str(out)]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=800)
    rows = {r["key"]: r for r in json.loads(out.read_text())["rows"]}
    for key in ("vllm", "engine-dense"):
        r = rows[key]
        assert r["error"] is None, r["error"]
        assert 1 <= r["decode_steps"] <= 6 and r["decode_tokens"] == 3 * r["decode_steps"], r
    assert rows["vllm"]["tokens"] == rows["engine-dense"]["tokens"]
