"""The properties every head kind's HF path must have, as assertions each kind's tests call with its own plan.

A model passed here is already patched with the kind's plan.
"""

from __future__ import annotations

import contextlib

import torch

from headwise import expected_length


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random token ids ``[batch, length]`` of the tiny models' vocabulary (ids 0-2 are special)."""
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, x: torch.Tensor, steps: int, **kwargs):
    return model.generate(input_ids=x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0, **kwargs)


def assert_cached_generation_equals_recomputation(model, prompt: int = 19, steps: int = 15):
    """Every cached decode step's logits equal a full forward over the sequence so far; returns the generation."""
    x = ids(1, prompt, seed=1)
    out = generate(model, x, steps)
    for t in range(steps):
        full = model(input_ids=out.sequences[:, : prompt + t], use_cache=False).logits[:, -1]
        assert torch.allclose(full, out.logits[t], atol=1e-4), f"step {t}"
    return out


def assert_chunked_prefill_equals_one_pass(model, cuts=(17, 35), total: int = 40, length_known: bool = False):
    """Prefill in chunks ending at ``cuts``, then one token at a time to ``total``: the logits of one pass.

    ``length_known``: run under ``expected_length(model, total)`` (plans with elastic spans)."""
    x = ids(2, total, seed=2)
    with expected_length(model, total) if length_known else contextlib.nullcontext():
        whole = model(input_ids=x).logits
        cache, pieces, start = None, [], 0
        for stop in [*cuts, *range(cuts[-1] + 1, total + 1)]:
            out = model(input_ids=x[:, start:stop], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, stop
            pieces.append(out.logits)
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-4)


def assert_padded_batches_equal_each_sample_alone(model, lengths=(23, 9, 16), steps: int = 8,
                                                  compare_logits: bool = True):
    """A right-padded forward and a left-padded ``generate`` give each sample what it gets alone (tokens,
    and the decode logits when ``compare_logits``)."""
    width = max(lengths)
    left, right = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    left_mask, right_mask = torch.zeros_like(left), torch.zeros_like(right)
    prompts = [ids(1, n, seed=n)[0] for n in lengths]
    for b, p in enumerate(prompts):
        left[b, width - len(p):], left_mask[b, width - len(p):] = p, 1
        right[b, :len(p)], right_mask[b, :len(p)] = p, 1
    batched = model(input_ids=right, attention_mask=right_mask).logits
    gen = generate(model, left, steps, attention_mask=left_mask)
    for b, p in enumerate(prompts):
        assert torch.allclose(batched[b, :len(p)], model(input_ids=p[None]).logits[0], atol=1e-4), f"sample {b}"
        one = generate(model, p[None], steps)
        assert torch.equal(gen.sequences[b, width:], one.sequences[0, len(p):]), f"sample {b}"
        if compare_logits:
            assert torch.allclose(torch.stack(gen.logits, 1)[b], torch.stack(one.logits, 1)[0], atol=1e-4)


def logits_with_attention(model, name: str, attention, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` with ``attention`` (a transformers attention function) registered as ``name`` in
    place of sdpa for one forward: the written-out references the kinds' tests compare with."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    try:
        return model(input_ids=input_ids).logits
    finally:
        model.set_attn_implementation("sdpa")
