"""scripts/bench_calibrated.py's per-prompt functions on a tiny model: a run extending a cache computes
only the rows it lacks, with the same results; recurrent-state plans are refused in dense/ctx modes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from headwise.plan import Plan

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_calibrated", ROOT / "scripts" / "bench_calibrated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    from headwise.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(config).eval(), tok


PROMPT = ("The grass is green. The sky is blue. " * 12 + "The pass key is 71432. Remember it. "
          + "The sun is yellow. " * 10 + "\n\nWhat is the pass key? The pass key is")


def test_only_missing_rows_are_computed(bench, tiny):
    from tests.kinds.test_hybrid import hybrid_plan

    model, tok = tiny
    plans = {"u": Plan.uniform(model, 0.5, sink=4), "h": hybrid_plan(model)}
    full = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, plans, ["sparse"])
    assert set(full) == {"dense", "u | sparse", "h | sparse"}
    part = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, plans, ["sparse"], need={"h | sparse"})
    assert set(part) == {"h | sparse"} and part["h | sparse"]["ok"] == full["h | sparse"]["ok"]
    modes = ["sparse", "dense", "ctx"]
    uni = {"u": plans["u"]}
    every = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, uni, modes)
    ctx = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, uni, modes, need={"u | ctx"})
    assert set(ctx) == {"u | ctx"} and ctx["u | ctx"] == every["u | ctx"]
    ppl = bench.perplexity_trial(model, tok, PROMPT, plans, ["sparse"], 16)
    only = bench.perplexity_trial(model, tok, PROMPT, plans, ["sparse"], 16, need={"u | sparse"})
    assert set(only) == {"u | sparse"} and only["u | sparse"] == ppl["u | sparse"]


def test_recurrent_plans_run_only_sparse(bench, tiny):
    from tests.kinds.test_hybrid import hybrid_plan

    plan = hybrid_plan(tiny[0])
    bench.check_modes("h.json", plan, ["sparse"])
    with pytest.raises(SystemExit, match="has hybrid heads .* run it with --modes sparse"):
        bench.check_modes("h.json", plan, ["sparse", "ctx"])
    bench.check_modes("u", Plan.uniform(tiny[0], 0.5), ["dense", "ctx"])
