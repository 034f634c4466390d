"""benchmarks/quality.py's per-prompt functions on a tiny model: a run extending a cache computes
only the rows it lacks, with the same results; recurrent-state plans get their states from the shared
dense prefill."""

from __future__ import annotations

import pytest
import torch

from benchmarks import quality as bench
from headwise.plan import Plan


PROMPT = ("The grass is green. The sky is blue. " * 12 + "The pass key is 71432. Remember it. "
          + "The sun is yellow. " * 10 + "\n\nWhat is the pass key? The pass key is")


def test_only_missing_rows_are_computed(tiny):
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


@pytest.mark.parametrize("kind", ["hybrid", "lightning", "hybrid_sink0"])
def test_shared_dense_prefill_builds_the_recurrent_states(tiny, kind):
    """plan_cache on the unpatched prefill's KV holds the states (and gives the greedy tokens) that
    patch_model(prefill="dense") builds on the whole prompt, for lightning and hybrid heads."""
    from headwise import expected_length, patch_model, unpatch_model
    from tests.kinds.test_hybrid import hybrid_plan
    from tests.kinds.test_lightning import lightning_plan

    model, tok = tiny
    make = {"hybrid": hybrid_plan, "lightning": lightning_plan, "hybrid_sink0": lambda m: hybrid_plan(m, ((0, 9), (3, 4)))}
    plan = make[kind](model)
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        dense = model(input_ids=ids, use_cache=True)
        patch_model(model, plan, prefill="dense")
        try:
            with expected_length(model, ids.shape[1] + 8):
                runtime_prefill = model(input_ids=ids, use_cache=True)
                shared = bench.plan_cache(model, bench.kv_of(dense.past_key_values))
                states = [(a.states, b.states) for a, b in zip(runtime_prefill.past_key_values.layers, shared.layers)]
                assert any(a for a, _ in states)
                for a, b in states:
                    assert a.keys() == b.keys()
                    for key in a:
                        assert torch.allclose(a[key]["s"], b[key]["s"], atol=1e-5), key
                want = bench.greedy(model, runtime_prefill.past_key_values, runtime_prefill.logits, 8, -1)
                assert bench.greedy(model, shared, dense.logits, 8, -1) == want
        finally:
            unpatch_model(model)
    rows = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, {"p": plan}, ["dense", "ctx"])
    assert set(rows) == {"dense", "p | dense", "p | ctx"}


@pytest.mark.parametrize("plan", ["uniform:0.25:4", "uniform:0.5:4", "dense"])
def test_guided_greedy_equals_step_greedy_for_any_guess(plan):
    """Verifying a guess in one forward gives exactly the tokens of greedy decoding step by step."""
    import random

    from headwise import expected_length, patch_model, unpatch_model
    from tests.conftest import make_tiny

    model = make_tiny("llama")
    ids = torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        kv, logits = bench.kv_of(out.past_key_values), out.logits
        dense = bench.greedy(model, out.past_key_values, logits, 12, -1)
        rng = random.Random(0)
        patch_model(model, plan, prefill="dense")
        try:
            with expected_length(model, 312):
                make = lambda: (bench.plan_cache(model, kv), logits)  # noqa: E731
                for done in (None, lambda t: 77 in t):
                    ref = bench.greedy(model, *make(), 12, -1, done)
                    guesses = [dense, ref, ref[:5] + [rng.randrange(128) for _ in range(7)],
                               [rng.randrange(128) for _ in range(12)], ref[:1], ref[:3], []]
                    for guess in guesses:
                        assert bench.greedy_guided(model, make, guess, 12, -1, done) == ref, (plan, guess)
        finally:
            unpatch_model(model)


def test_kv_store_reproduces_the_dense_prefill(tiny, tmp_path):
    """A prompt's dense-prefill KV read back from --kv-store gives the same rows as computing it."""
    model, tok = tiny
    plans = {"u": Plan.uniform(model, 0.5, sink=4)}
    modes = ["dense", "ctx"]
    plain = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, plans, modes)
    kv_file = tmp_path / "kv" / "p.safetensors"
    first = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, plans, modes, kv_file=kv_file)
    assert kv_file.is_file()
    again = bench.retrieval_trial(model, tok, PROMPT, ["71432"], 6, plans, modes, kv_file=kv_file)
    strip = lambda rows: {r: v["ok"] for r, v in rows.items()}  # noqa: E731
    assert strip(first) == strip(plain) == strip(again)
    ids, context = bench.split_at_question(tok, PROMPT)
    with torch.no_grad():
        _, kv, logits, _ = bench.dense_prefill(model, ids, context, None)
        _, stored, stored_logits, _ = bench.dense_prefill(model, ids, context, kv_file)
    assert torch.equal(stored_logits, logits)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(kv, stored))


def test_dense_mode_perplexity_does_not_depend_on_the_chunk(tiny):
    """The second half of a document reads what decode steps read, whatever the forward's chunk."""
    model, tok = tiny
    plans = {"u": Plan.uniform(model, 0.3, sink=4)}
    with torch.no_grad():
        one = bench.perplexity_trial(model, tok, PROMPT, plans, ["dense"], 1)
        whole = bench.perplexity_trial(model, tok, PROMPT, plans, ["dense"], 1024)
    assert one["u | dense"][1] == whole["u | dense"][1]
    assert abs(one["u | dense"][0] - whole["u | dense"][0]) < 1e-3 * abs(one["u | dense"][0])


def test_dense_perplexity_applies_the_output_head_in_chunks_with_the_full_forward_result(tiny):
    """The dense row's NLL (decoder once, output head ``chunk`` positions at a time, so a 152k-token
    vocabulary at 16k does not hold ``P x V`` logits) is the whole-logits NLL of the second half."""
    model, tok = tiny
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    half = (ids.shape[1] - 1) // 2 + 1
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:],
                                                reduction="none")[half - 1:]
        for chunk in (1, 7, 4096):
            total, count = bench.dense_second_half(model, ids, half, chunk)
            assert count == nll.numel() == ids.shape[1] - half
            assert abs(total - float(nll.sum())) <= 1e-4 * float(nll.sum())
        assert bench.perplexity_trial(model, tok, PROMPT, {}, ["dense"], 16)["dense"] == \
            bench.dense_second_half(model, ids, half, 16)


def test_targets_compare_rows_on_the_prompts_they_share():
    """A row with more trials (dense) does not skew the comparison: only prompts every row has count."""
    ok = lambda *flags: {i: {"ok": f} for i, f in enumerate(flags)}   # noqa: E731
    per_prompt = {("dense", "passkey", 2048): ok(True, True, True, True),
                  ("u | dense", "passkey", 2048): ok(False, False),
                  ("p | dense", "passkey", 2048): ok(True, False)}
    at25 = bench.targets_for(None, 0.25)
    line, = bench.target_checks(per_prompt, "dense", "u | dense", "p | dense", ["passkey"], [2048], at25)
    assert "(2 trials): 50%, dense 100%, uniform 0%; of dense 0.50 (target >= 1.00: missed); at least uniform: met" \
        in line
    per_prompt = {("dense", "perplexity", 2048): {0: [100.0, 50], 1: [400.0, 50]},
                  ("u | dense", "perplexity", 2048): {0: [101.0, 50]},
                  ("p | dense", "perplexity", 2048): {0: [100.5, 50], 1: [800.0, 50]}}
    line, = bench.target_checks(per_prompt, "dense", "u | dense", "p | dense", ["perplexity"], [2048], at25)
    assert line.startswith("p | dense: perplexity 2048 (1 docs): 7.463 vs dense 7.389 (+1.0%; target <= +5.0%: met)")
    assert line.endswith("(+2.0%; below uniform: met)")
    line, = bench.target_checks(per_prompt, "dense", "u | dense", "p | dense", ["perplexity"], [2048],
                                bench.targets_for(None, 0.5))
    assert "target <= +1.5%: met" in line


@pytest.mark.parametrize("model,density,n,kind,wanted", [
    (None, 0.25, 4096, "niah", 0.95), (None, 0.25, 8192, "niah", 0.85), (None, 0.25, 8192, "passkey", 1.0),
    (None, 0.5, 8192, "niah", 1.0), ("qwen2.5-coder-0.5b", 0.25, 32768, "passkey", 0.95),
    ("qwen2.5-coder-0.5b", 0.25, 16384, "niah", 0.90)], ids=str)
def test_targets_are_the_open_issues(model, density, n, kind, wanted):
    assert bench.targets_for(model, density).retrieval(kind, n) == wanted
