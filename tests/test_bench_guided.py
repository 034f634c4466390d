"""scripts/bench_calibrated.py: guided greedy decoding gives exactly the tokens of step-by-step greedy."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from headwise import expected_length, patch_model, unpatch_model
from tests.conftest import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from bench_calibrated import greedy, greedy_guided, kv_of, plan_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.mark.parametrize("plan", ["uniform:0.25:4", "uniform:0.5:4", "dense"])
def test_guided_greedy_equals_step_greedy_for_any_guess(plan):
    model = make_tiny("llama")
    ids = torch.randint(3, 120, (1, 300), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    kv, logits = kv_of(out.past_key_values), out.logits
    dense = greedy(model, out.past_key_values, logits, 12, -1)
    rng = random.Random(0)
    patch_model(model, plan, prefill="dense")
    try:
        with expected_length(model, 312):
            make = lambda: (plan_cache(model, kv), logits)  # noqa: E731
            for done in (None, lambda t: 77 in t):
                ref = greedy(model, *make(), 12, -1, done)
                guesses = [dense, ref, ref[:5] + [rng.randrange(128) for _ in range(7)],
                           [rng.randrange(128) for _ in range(12)], ref[:1], ref[:3], []]
                for guess in guesses:
                    assert greedy_guided(model, make, guess, 12, -1, done) == ref, (plan, guess)
    finally:
        unpatch_model(model)
