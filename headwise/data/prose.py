"""Real English prose available offline: CPython's own ``pydoc_data.topics``.

Every Python install ships this module: ~465k characters (~110k tokens with SmolLM2's tokenizer)
of reference prose. Calibration samples, fitting slices, haystacks, perplexity documents and
benchmark prompts are all slices of it, never repeated filler, and all read it through this module.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
import sys
import weakref
from dataclasses import dataclass

SOURCE = "pydoc_data.topics (CPython reference prose)"


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """All pydoc topics in sorted-name order, each stripped, separated by blank lines (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def corpus_description() -> dict:
    """Which text it is (source, Python version, length, sha256 prefix): for plans and cache keys."""
    text = corpus_text()
    return {"source": SOURCE, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "characters": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


_IDS: "weakref.WeakKeyDictionary[object, tuple[int, ...]]" = weakref.WeakKeyDictionary()


def corpus_ids(tokenizer) -> tuple[int, ...]:
    """The whole corpus as token ids (no special tokens), cached per tokenizer object."""
    if tokenizer not in _IDS:
        _IDS[tokenizer] = tuple(tokenizer(corpus_text(), add_special_tokens=False).input_ids)
    return _IDS[tokenizer]


def corpus_slice(tokenizer, offset: int, length: int):
    """Corpus tokens ``[offset, offset + length)`` as a ``[1, length]`` int64 tensor; one sentence
    when the slice falls outside the corpus."""
    import torch

    ids = corpus_ids(tokenizer)
    if offset < 0 or length < 1 or offset + length > len(ids):
        raise ValueError(f"prose slice {offset}..{offset + length} is outside the corpus of {len(ids)} tokens; "
                         "ask for a shorter or earlier slice.")
    return torch.tensor([ids[offset:offset + length]])


def token_stream(tokenizer, min_tokens: int) -> list[int]:
    """The corpus tokens, repeated end to end until at least ``min_tokens`` long (benchmark prompts
    longer than the corpus)."""
    ids = list(corpus_ids(tokenizer))
    if not ids:
        raise ValueError("the tokenizer returned no tokens for the prose corpus.")
    while len(ids) < min_tokens:
        ids = ids + ids
    return ids


@dataclass(frozen=True)
class TokenizedProse:
    """The corpus with the character span of every token, for slicing by token count."""

    text: str
    starts: tuple[int, ...]   # character offset where token i starts
    ends: tuple[int, ...]     # character offset where token i ends

    @property
    def num_tokens(self) -> int:
        return len(self.starts)

    def random_start(self, rng: random.Random, num_tokens: int) -> int:
        """A token index where a slice of ``num_tokens`` tokens fits, at the start of a paragraph."""
        last = self.num_tokens - num_tokens
        if last < 0:
            raise ValueError(f"the prose corpus has {self.num_tokens} tokens, fewer than the {num_tokens} asked for; "
                             "ask for a shorter context.")
        index = rng.randint(0, last)
        para = self.text.rfind("\n\n", 0, self.starts[index])
        char = 0 if para < 0 else para + 2
        return min(bisect.bisect_left(self.starts, char), last)

    def char_at(self, start: int, num_tokens: int, fraction: float) -> int:
        """Character position, inside ``slice(start, num_tokens)``, of the token ``fraction`` of the way in."""
        index = start + min(num_tokens, max(0, round(fraction * num_tokens)))
        raw = self.text[self.starts[start]:]
        lead = len(raw) - len(raw.lstrip())
        at = self.starts[index] if index < self.num_tokens else len(self.text)
        return max(0, at - self.starts[start] - lead)

    def slice(self, start: int, num_tokens: int) -> str:
        """Text of tokens ``start .. start + num_tokens`` (re-tokenizes to about ``num_tokens``)."""
        if num_tokens <= 0:
            return ""
        end = min(self.num_tokens, start + num_tokens) - 1
        return self.text[self.starts[start]:self.ends[end]].strip()


_CACHE: "weakref.WeakKeyDictionary[object, TokenizedProse]" = weakref.WeakKeyDictionary()


def tokenized_prose(tokenizer) -> TokenizedProse:
    """The corpus tokenized with ``tokenizer`` (a fast tokenizer; cached per tokenizer object)."""
    if tokenizer not in _CACHE:
        text = corpus_text()
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if not offsets:
            raise ValueError("the tokenizer returned no offsets; headwise eval needs a fast (Rust) tokenizer.")
        _CACHE[tokenizer] = TokenizedProse(text, tuple(s for s, _ in offsets), tuple(e for _, e in offsets))
    return _CACHE[tokenizer]
