"""The benchmarks' shared helpers, and every benchmark and research script starting from any folder."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.common import (REPO, FullBatchDecode, ResultStore, Setting, greedy_agreement, logit_ulp, make_prompts,
                               per_length, plan_key, provenance, spread_rank, vllm_cpu_env)

SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in [*(REPO / "benchmarks").glob("*.py"),
                                                          *(REPO / "scripts").glob("*.py")]
                 if p.name not in ("__init__.py", "common.py"))
#: The fast tier starts one script per folder (they share one bootstrap); `make test-all` starts them all.
FAST_SCRIPTS = ("benchmarks/decode.py", "scripts/probe_moh.py")


def test_result_store_resumes_from_its_file(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store["a"] = {"ok": True}
    store["b"] = [1.5, 3]
    again = ResultStore(path)
    assert again == {"a": {"ok": True}, "b": [1.5, 3]}
    assert ResultStore(None) == {} and not (tmp_path / "None").exists()


def test_logit_ulp_is_the_spacing_of_the_dtype():
    assert logit_ulp(20.0, torch.bfloat16) == 0.125 and logit_ulp(-20.0, torch.bfloat16) == 0.125
    assert logit_ulp(1.0, torch.float32) == 2.0 ** -23
    assert float(torch.tensor(20.0 + logit_ulp(20.0, torch.bfloat16), dtype=torch.bfloat16)) == 20.125


@pytest.mark.parametrize("tokens, top, expected", [
    pytest.param([5, 6, 7], [], (True, None), id="same"),
    pytest.param([5, 9, 1], [[(5, 3.0)], [(6, 20.0), (9, 20.0)], []], (True, 1), id="exact-tie"),
    pytest.param([5, 9, 1], [[(5, 3.0)], [(6, 20.125), (9, 20.0)], []], (True, 1), id="one-ulp"),
    pytest.param([5, 9, 1], [[(5, 3.0)], [(6, 20.25), (9, 20.0)], []], (False, 1), id="two-ulps"),
    pytest.param([5, 8, 7], [[(5, 3.0)], [(6, 20.0), (9, 20.0)], []], (False, 1), id="not-a-candidate"),
    pytest.param([5, 6], [], (False, 2), id="shorter"),
])
def test_greedy_agreement_allows_a_tie_at_the_first_difference(tokens, top, expected):
    assert greedy_agreement([5, 6, 7], top, tokens, torch.bfloat16) == expected


def test_greedy_agreement_in_fp32_needs_logits_within_one_ulp():
    top = [[(6, 20.0), (9, 20.0 - 2.0 ** -19)]]
    assert greedy_agreement([6], top, [9], torch.float32) == (True, 0)
    assert greedy_agreement([6], [[(6, 20.0), (9, 19.999)]], [9], torch.float32) == (False, 0)


def test_spread_rank_orders_every_trial_once_and_spreads_prefixes():
    for count in (1, 2, 5, 8, 20):
        ranks = [spread_rank(i, count) for i in range(count)]
        assert len(set(ranks)) == count and all(0 <= r < 1 for r in ranks)
    order = sorted(range(8), key=lambda i: spread_rank(i, 8))
    assert order[:4] == [0, 4, 2, 6]                     # the first half of the run covers every quarter


def test_full_batch_decode_times_only_steps_where_every_request_decodes():
    decode = FullBatchDecode(batch=4)
    for seconds, tokens in [(0.3, 4), (0.3, 4), (0.2, 3), (0.1, 1)]:     # requests ending one by one
        decode.add(seconds, tokens)
    assert (decode.steps, decode.tokens) == (2, 8)
    assert decode.seconds == pytest.approx(0.6) and decode.step_seconds == [0.3, 0.3]


def test_vllm_cpu_env_binds_threads_and_sets_the_kv_space_only_when_given():
    assert vllm_cpu_env(2, 4) == {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                                  "VLLM_CPU_KVCACHE_SPACE": "4"}
    assert vllm_cpu_env(1) == {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def test_per_length_and_plan_key():
    assert per_length("50", [2048, 4096]) == [50, 50]
    assert per_length("50,20", [2048, 4096]) == [50, 20]
    with pytest.raises(SystemExit, match="--ppl-docs needs one count or one per length"):
        per_length("1,2,3", [2048, 4096], "--ppl-docs")
    assert plan_key("dense") == "dense"


def test_prompts_are_distinct_prose_slices_of_exact_length():
    from transformers import AutoTokenizer

    from headwise.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    prompts = make_prompts(Setting(300, 3), tok)
    assert [len(p) for p in prompts] == [300] * 3 and prompts[0] != prompts[1]
    assert make_prompts(Setting(300, 3), tok) == prompts
    random = make_prompts(Setting(10, 2), vocab_size=50)
    assert all(3 <= t < 50 for p in random for t in p)


def test_provenance_names_date_commit_machine_and_command():
    info = provenance()
    assert set(info) == {"date", "commit", "machine", "command"}
    assert info["date"].endswith("UTC") and "CPUs" in info["machine"] and info["commit"]


def test_fast_tier_scripts_exist():
    assert set(FAST_SCRIPTS) <= set(SCRIPTS)


@pytest.mark.parametrize("script", [pytest.param(s, marks=() if s in FAST_SCRIPTS else pytest.mark.slow)
                                    for s in SCRIPTS])
def test_script_starts_from_any_folder(script, tmp_path):
    """``python <script> --help`` from another folder: the script imports this checkout's code."""
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
