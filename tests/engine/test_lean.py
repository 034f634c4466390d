"""The lean decode forward (engine/lean.py) computes what the HF forward computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise.engine import LLM
from headwise.engine import lean as lean_module
from headwise.engine.lean import LeanDecoder, lean_decoder
from tests.conftest import TINY_CONFIGS, make_tiny
from tests.engine.conftest import greedy, random_prompts


def causal_attend(layer, q, k, v, scale):
    """Plain causal attention over the step's own tokens: ``q [H, T, D]``, ``k, v [Hkv, T, D]`` -> ``[T, H, D]``."""
    group = q.shape[0] // k.shape[0]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_lean_logits_equal_hf_forward(arch, tokens):
    model = make_tiny(arch)
    lean = lean_decoder(model)
    assert isinstance(lean, LeanDecoder), f"{arch} should take the lean path"
    ids = torch.randint(3, 128, (tokens,), generator=torch.Generator().manual_seed(tokens))
    positions = torch.arange(17, 17 + tokens)
    rows = torch.tensor([tokens - 1, 0])
    with torch.inference_mode():
        ref = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0, rows]
        got = lean.forward(ids, positions, rows, causal_attend)
    # fp32 in another summation order (the native skinny kernel, whose order differs between AVX2 and
    # AVX-512 machines): the error scales with the largest logit (about 5 here), not with each one.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("tile", [16, 4096], ids=["tiles-of-16-rows", "one-tile"])
def test_lean_prefill_logits_equal_hf_forward(arch, tile, monkeypatch):
    monkeypatch.setattr(lean_module, "PREFILL_TILE_BYTES", 1)
    monkeypatch.setattr(lean_module, "PREFILL_MIN_TILE", tile)
    model = make_tiny(arch)
    ids = torch.randint(3, 128, (57,), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(57)
    rows = torch.tensor([56, 0, 17])
    with torch.inference_mode():
        ref = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0, rows]
        got = lean_decoder(model).prefill_forward(ids, positions, rows, causal_attend)
        none = lean_decoder(model).prefill_forward(ids, positions, rows[:0], causal_attend)   # a chunk that samples nothing
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert none.shape == (0, ref.shape[1])


@pytest.mark.parametrize("tile", [16, 4096], ids=["prefill-tiles-of-16-rows", "prefill-in-one-tile"])
def test_lean_and_hf_forward_give_the_same_engine_tokens(tile, monkeypatch):
    monkeypatch.setattr(lean_module, "PREFILL_TILE_BYTES", 1)
    monkeypatch.setattr(lean_module, "PREFILL_MIN_TILE", tile)
    model = make_tiny("qwen3")
    prompts = random_prompts((3, 40, 97), seed=4)
    outs = {}
    for lean in (True, False):
        llm = LLM(model, plan="uniform:0.25:4", kv_cache_memory="16MiB", block_size=8, native_linear=lean)
        assert (llm.runner.lean is not None) == lean
        outs[lean] = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                     greedy(10), use_tqdm=False)]
    assert outs[True] == outs[False]


def test_other_models_keep_the_hf_forward():
    model = make_tiny("llama")
    model.config.hidden_act = "gelu"
    assert lean_decoder(model) is None
