"""Task generators: deterministic, sized to the token, needles really at their stated depth."""

from __future__ import annotations

import pytest

from headwise.eval import passkey_samples
from headwise.eval.fitting import count_tokens
from headwise.data.prose import corpus_text
from headwise.eval.tasks import (GENERATORS, KV_INTRO, KV_QUESTION, NIAH_INTRO, NIAH_QUESTION, PASSKEY_INTRO,
                                 PASSKEY_QUESTION, VT_INTRO, VT_QUESTION, generate, insert_at_depths, sweep_depths)

LENGTHS = [700, 3000]
RETRIEVAL = ["passkey", "niah", "kv", "vt"]
# (text that ends the fixed intro, text that starts the question) of each retrieval task
BOUNDS = {"passkey": (PASSKEY_INTRO, PASSKEY_QUESTION[:20]), "niah": (NIAH_INTRO, NIAH_QUESTION[:30]),
          "kv": (KV_INTRO, KV_QUESTION[:8]), "vt": (VT_INTRO, VT_QUESTION[:20])}


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_deterministic_by_seed(tokenizer, task):
    a = generate(task, tokenizer, 700, 2, seed=3)
    b = generate(task, tokenizer, 700, 2, seed=3)
    c = generate(task, tokenizer, 700, 2, seed=4)
    assert [s.to_json() for s in a] == [s.to_json() for s in b]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert a[0].prompt != a[1].prompt


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_token_length_within_one_percent(tokenizer, task, length):
    for sample in generate(task, tokenizer, length, 3, seed=1):
        n = count_tokens(tokenizer, sample.prompt)
        assert n == sample.num_tokens
        assert 0.99 * length <= n <= length, (task, length, n)


@pytest.mark.parametrize("task", RETRIEVAL)
def test_needle_in_context_at_stated_depth(tokenizer, task):
    length = 3000
    for sample in generate(task, tokenizer, length, 5, seed=2):
        assert sample.prompt.count(sample.needle) == 1
        for answer in sample.answers:
            assert answer in sample.prompt
        intro, question = BOUNDS[task]
        start = sample.prompt.index(intro) + len(intro)
        end = sample.prompt.rindex(question)
        at = sample.prompt.index(sample.needle)
        haystack = count_tokens(tokenizer, sample.prompt[start:end])
        before = count_tokens(tokenizer, sample.prompt[start:at])
        assert abs(before / haystack - sample.depth) < 0.03, (task, sample.depth, before / haystack)


def test_depths_sweep_and_asked_needle_among_several(tokenizer):
    samples = generate("niah", tokenizer, 1500, 4, seed=0)
    assert [s.depth for s in samples] == sweep_depths(4) == [0.125, 0.375, 0.625, 0.875]
    for s in samples:
        assert s.prompt.count("One of the special magic numbers for") == 4
        assert s.answers[0] in s.needle


def test_variable_tracking_chain_is_ordered(tokenizer):
    for s in generate("vt", tokenizer, 2000, 3, seed=0):
        positions = [s.prompt.index(f"VAR {name} =") for name in s.answers]
        assert positions == sorted(positions)
        assert len(set(s.answers)) == 5


def test_perplexity_documents_nest_across_lengths(tokenizer):
    short, long = (generate("perplexity", tokenizer, n, 1, seed=0)[0].prompt for n in (1000, 3000))
    assert long.startswith(short[:-20])


def test_haystacks_are_real_prose_not_filler(tokenizer):
    corpus = corpus_text()
    for s in generate("perplexity", tokenizer, 2000, 2, seed=0):
        assert s.prompt in corpus
        sentences = [x for x in s.prompt.split(". ") if len(x) > 30]
        assert len(set(sentences)) == len(sentences)


def test_insert_at_depths_keeps_haystack():
    hay = "One. Two. Three. Four. Five. Six. Seven. Eight."
    out = insert_at_depths(hay, [(0.5, "NEEDLE."), (0.0, "FIRST.")])
    assert out.startswith("FIRST. One.")
    assert out.replace("NEEDLE. ", "").replace("FIRST. ", "") == hay
    assert abs(out.index("NEEDLE") / len(hay) - 0.5) < 0.15


def test_passkey_samples_interface_for_the_demo(tokenizer):
    samples = passkey_samples(tokenizer, 1024, [0.1, 0.9], seed=5)
    assert [s.depth for s in samples] == [0.1, 0.9]
    for s in samples:
        assert s.answer in s.prompt and 0.99 * 1024 <= s.num_tokens <= 1024
