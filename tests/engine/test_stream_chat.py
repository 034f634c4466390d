"""Streaming text deltas (incremental detokenization), chat through the model's template, and the vLLM
sampling fields the engine implements (min_tokens, penalties, dict params) or refuses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from headwise.engine import LLM, SamplingParams
from headwise.engine.detokenize import IncrementalDetokenizer
from headwise.errors import InputError
from tests.engine.conftest import greedy, random_prompts

# Texts whose characters the SmolLM2 tokenizer splits over tokens: an emoji over three tokens (the first
# holding its leading space), CJK characters split in two, accents, an emoji with a skin-tone modifier.
TEXTS = ["autumn 🍂 leaves fall", "秋の夕暮れ 紅葉", "naïve café ünïcödé", "😀👍🏽 ok", "plain words only"]


@pytest.fixture(scope="module")
def tokenizer():
    from headwise.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def vocab_model(tokenizer):
    """A tiny random Llama with the embedded model's vocabulary (its own tokens are scripted in these tests)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def deltas(tokenizer, ids: list[int], prompt_ids=(1, 2, 3)) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids))
    return [detok.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids)]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_the_text_and_never_split_a_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    parts = deltas(tokenizer, ids)
    assert "".join(parts) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in parts)                    # no half character is ever given out
    if any("\ufffd" in tokenizer.decode([t]) for t in ids):           # the text really splits a character ...
        assert "" in parts                                           # ... and the split is held back, not emitted


def test_known_splits_come_out_whole(tokenizer):
    """'🍂' is three tokens here (' \\x..', '\\x..', '\\x..'): nothing for the first two, ' 🍂' with the third;
    a word split in two ('aut' + 'umn') comes out piece by piece, each piece as soon as it is complete."""
    ids = tokenizer("autumn 🍂 leaves", add_special_tokens=False).input_ids
    pieces = [tokenizer.decode([t]) for t in ids]
    assert pieces[:2] == ["aut", "umn"] and all("\ufffd" in p for p in pieces[2:5])     # the premise
    assert deltas(tokenizer, ids) == ["aut", "umn", "", "", " 🍂", " leaves"]


def test_an_unfinished_character_is_given_out_when_the_request_ends(tokenizer):
    ids = tokenizer("a 🍂", add_special_tokens=False).input_ids[:-1]          # ends inside the emoji
    parts = deltas(tokenizer, ids)
    assert parts[-1].endswith("\ufffd") and "".join(parts) == tokenizer.decode(ids)


def scripted(monkeypatch, ids: list[int]):
    """Make the engine 'sample' ``ids`` in order (one request), whatever the logits say."""
    script = iter(ids)
    monkeypatch.setattr("headwise.engine.llm.sample", lambda logits, params, generator: next(script))


@pytest.mark.parametrize("text", TEXTS[:4])
def test_engine_stream_deltas_equal_the_output_text(monkeypatch, tokenizer, vocab_model, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    scripted(monkeypatch, ids)
    llm = LLM(vocab_model, plan="dense", tokenizer=tokenizer, kv_cache_memory="4MiB", block_size=8)
    events = list(llm.stream(["Tell me"], greedy(len(ids))))
    assert [e.token_id for e in events] == ids
    assert "".join(e.delta for e in events) == events[-1].text == text
    assert all(e.text == "".join(x.delta for x in events[:i + 1]) for i, e in enumerate(events))
    assert all("\ufffd" not in e.delta for e in events)
    assert events[-1].finished and events[-1].finish_reason == "length"


def test_stream_holds_back_a_stop_string_split_over_tokens(monkeypatch, tokenizer, vocab_model):
    """The stop string 'mn 🍂 l' spans five tokens; no part of it is ever streamed and the text ends before it."""
    ids = tokenizer("autumn 🍂 leaves fall", add_special_tokens=False).input_ids
    scripted(monkeypatch, ids)
    llm = LLM(vocab_model, plan="dense", tokenizer=tokenizer, kv_cache_memory="4MiB", block_size=8)
    params = SamplingParams(max_tokens=len(ids), temperature=0, ignore_eos=True, stop=["mn 🍂 l"])
    events = list(llm.stream(["Tell me"], params))
    assert "".join(e.delta for e in events) == events[-1].text == "autu"
    assert events[-1].finish_reason == "stop" and len(events) == 6          # ended at ' leaves'
    scripted(monkeypatch, ids)
    params.include_stop_str_in_output = True
    kept = list(llm.stream(["Tell me"], params))
    assert "".join(e.delta for e in kept) == kept[-1].text == "autumn 🍂 l" and len(kept) == 6


def test_min_tokens_masks_eos_and_stop_token_ids(llama):
    prompt = random_prompts((20,), seed=21)[0]
    llm = LLM(llama, plan="dense", kv_cache_memory="8MiB")
    free = llm.generate([{"prompt_token_ids": prompt}], greedy(12), use_tqdm=False)[0].outputs[0].token_ids
    stop_id = free[1]
    ended = llm.generate([{"prompt_token_ids": prompt}],
                         SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]),
                         use_tqdm=False)[0].outputs[0]
    assert ended.token_ids == free[:free.index(stop_id) + 1] and ended.finish_reason == "stop"
    held = llm.generate([{"prompt_token_ids": prompt}],
                        SamplingParams(max_tokens=12, min_tokens=6, temperature=0, ignore_eos=True,
                                       stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert stop_id not in held.token_ids[:6] and len(held.token_ids) >= 6


def test_penalties_change_greedy_tokens_and_dict_params_work(llama):
    prompt = random_prompts((30,), seed=22)[0]
    llm = LLM(llama, plan="dense", kv_cache_memory="8MiB")
    plain = llm.generate([{"prompt_token_ids": prompt}], {"max_tokens": 20, "temperature": 0, "ignore_eos": True},
                         use_tqdm=False)[0].outputs[0].token_ids
    assert plain == llm.generate([{"prompt_token_ids": prompt}], greedy(20), use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(plain)) < len(plain)                            # a random tiny model repeats itself ...
    strong = llm.generate([{"prompt_token_ids": prompt}],
                          {"max_tokens": 20, "temperature": 0, "ignore_eos": True, "frequency_penalty": 2.0,
                           "presence_penalty": 2.0}, use_tqdm=False)[0].outputs[0].token_ids
    assert len(set(strong)) > len(set(plain))                       # ... less so when repeats are penalized
    rep = llm.generate([{"prompt_token_ids": prompt}],
                       {"max_tokens": 20, "temperature": 0, "ignore_eos": True, "repetition_penalty": 5.0},
                       use_tqdm=False)[0].outputs[0].token_ids
    assert rep != plain


@pytest.mark.parametrize("field, value", [("n", 2), ("best_of", 2), ("logprobs", 1), ("prompt_logprobs", 0)])
def test_unsupported_vllm_fields_are_refused_with_one_sentence(field, value):
    with pytest.raises(InputError, match=f"SamplingParams.{field}") as info:
        SamplingParams(**{field: value}).check()
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_chat_applies_the_template(real_model):
    """The embedded instruct model answers a chat; the prompt is the template's, ending with the assistant's turn."""
    model, tokenizer = real_model
    llm = LLM(model, plan="uniform:0.5", tokenizer=tokenizer, kv_cache_memory="64MiB")
    out = llm.chat([{"role": "user", "content": "Write a haiku about autumn."}],
                   SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    assert out.error is None and out.outputs[0].text.strip()
    assert out.prompt.startswith("<|im_start|>") and out.prompt.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == tokenizer(out.prompt, add_special_tokens=False).input_ids
    streamed = list(llm.stream([{"messages": [{"role": "user", "content": "Write a haiku about autumn."}]}],
                               SamplingParams(max_tokens=12, temperature=0)))
    assert "".join(e.delta for e in streamed) == out.outputs[0].text


@pytest.mark.real_model
def test_generate_cli_chat_streams(capsys):
    from headwise.cli import main

    rc = main(["generate", "--chat", "--stream", "--prompt", "Write a haiku about autumn.", "--temperature", "0",
               "--max-tokens", "6", "--kv-cache-memory", "64MiB"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.strip()
    assert "in whole 16-token blocks: held" in captured.err
