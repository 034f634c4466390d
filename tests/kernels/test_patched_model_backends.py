"""The patched real model gives the same logits and tokens with the ``cpu`` backend as with ``naive``."""

from __future__ import annotations

import pytest
import torch

from headwise import Plan, patch_model, unpatch_model
from headwise.kinds.dense import Dense


def prose_batch(tokenizer, lengths):
    """Left-padded batch of real prose (CPython's pydoc topics) with the given token counts."""
    import pydoc_data.topics as topics

    ids = tokenizer(" ".join(topics.topics.values()), return_tensors="pt").input_ids[0]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, (n, start) in enumerate(zip(lengths, [0, 5000])):
        input_ids[row, width - n:] = ids[start:start + n]
        mask[row, width - n:] = 1
    return input_ids, mask


def mixed_plan(model) -> Plan:
    """25% uniform windows, with KV head 0 of every third layer dense (mixed layers) and one all-dense layer."""
    uniform = Plan.uniform(model, density=0.25, sink=64)
    layers = []
    for i, heads in enumerate(uniform.layers):
        if i == 1:
            layers.append(tuple(Dense() for _ in heads))
        elif i % 3 == 0:
            layers.append((Dense(), *heads[1:]))
        else:
            layers.append(heads)
    return Plan(uniform.model, tuple(layers), {"method": "test-mixed"})


def run(model, plan, backend, input_ids, mask, use_cache, decode_steps=3):
    """Logits of a prompt forward, then of ``decode_steps`` greedy decode steps through the cache."""
    patch_model(model, plan, backend=backend)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, use_cache=use_cache)
            logits = [out.logits]
            cache = out.past_key_values
            for _ in range(decode_steps if use_cache else 0):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                out = model(input_ids=logits[-1][:, -1:].argmax(-1), attention_mask=mask, past_key_values=cache,
                            use_cache=True)
                logits.append(out.logits)
    finally:
        unpatch_model(model)
    return logits


@pytest.mark.slow
@pytest.mark.parametrize("lengths,use_cache", [([1024, 700], True), ([1024], False)],
                         ids=["left-padded-batch-headwise-cache-and-decode", "one-prompt-no-cache"])
def test_cpu_backend_matches_naive_on_real_model(real_model, lengths, use_cache):
    model, tokenizer = real_model
    input_ids, mask = prose_batch(tokenizer, lengths)
    plan = mixed_plan(model)
    naive = run(model, plan, "naive", input_ids, mask, use_cache)
    fast = run(model, plan, "cpu", input_ids, mask, use_cache)
    real = mask.bool()
    assert torch.isfinite(fast[0][real]).all()
    # fp32 everywhere; the backends differ only in summation order, amplified through 30 layers.
    torch.testing.assert_close(fast[0][real], naive[0][real], atol=2e-3, rtol=1e-3)
    for step, (got, expected) in enumerate(zip(fast[1:], naive[1:])):
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3, msg=lambda m: f"decode step {step}: {m}")
