"""One plan with every built-in head kind: it loads from its files, runs in HF and in the engine, and shows."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headwise import Plan, load_plan, patch_model, unpatch_model
from headwise.kinds.hybrid import Hybrid
from headwise.kinds.lightning import Lightning
from headwise.kinds.moh import MoH
from headwise.kinds.softplus import Softplus
from headwise.plan import Dense, ModelInfo, Window
from tests.conftest import TINY
from tests.engine.conftest import assert_engine_equals_patched_hf, random_prompts
from tests.kinds.test_hybrid import head_weights as hybrid_weights
from tests.kinds.test_lightning import F
from tests.kinds.test_lightning import head_weights as lightning_weights
from tests.kinds.test_moh import moh_weights

KINDS = ("dense", "window", "lightning", "softplus", "moh", "hybrid")


def three_layer_llama():
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 3})
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def every_kind_plan(model) -> Plan:
    """Layer 0: dense + window; layer 1: lightning + softplus (LSSAR); layer 2: moh (top 2 of its 3
    query heads) + hybrid. 2 KV heads of 3 query heads each."""
    info = ModelInfo.of(model)
    G, D, H = info.num_heads // info.num_kv_heads, info.head_dim, info.num_heads
    weights = {**lightning_weights("light", G, D, 0), **moh_weights("moh", G, D, H, 1),
               **hybrid_weights("hyb", G, D, 2)}
    layers = ((Dense(), Window(sink=2, alpha=5.0)),
              (Lightning(decay=0.9, feature_dim=F, weights="light"),
               Softplus(nonlinearity="softplus", scale="log", scale_length=16, power=3.0)),
              (MoH(top_k=2, weights="moh"), Hybrid(sink=2, window=4, decay=0.9, feature_dim=F, weights="hyb")))
    return Plan(info, layers, {"method": "test"}, weights=weights)


@pytest.fixture
def model():
    return three_layer_llama()


def test_plan_with_every_kind_round_trips_and_runs_cached_as_recomputed(model, tmp_path):
    every_kind_plan(model).save(tmp_path / "p.json")
    plan = load_plan(tmp_path / "p.json", model)
    assert sorted({h.kind for layer in plan.layers for h in layer}) == sorted(KINDS)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    patch_model(model, plan)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            full = model(out.sequences[:, :-1]).logits          # every position recomputed without a cache
    finally:
        unpatch_model(model)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[0, ids.shape[1] - 1 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("step_tokens", [512, 16], ids=["whole-prompts", "chunked-prefill"])
def test_engine_runs_every_kind_with_the_patched_model_tokens(model, step_tokens):
    assert_engine_equals_patched_hf(model, every_kind_plan(model), random_prompts((3, 30, 75), seed=5), 8,
                                    max_num_batched_tokens=step_tokens)


def test_plan_show_lists_every_kind(model, tmp_path, capsys):
    from headwise.cli import main

    every_kind_plan(model).save(tmp_path / "p.json")
    assert main(["plan", "show", str(tmp_path / "p.json"), "--lengths", "64,128"]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert re.search(rf"^\s*{kind}\s+1\s", out, re.M), f"no memory row for {kind}:\n{out}"
