"""Incremental detokenization: the text each new token adds, right across words and UTF-8 characters.

A byte-level BPE token can hold part of a multi-byte character (an emoji is often 2-4 tokens), and
SentencePiece tokenizers decide a word's leading space from its neighbours, so decoding tokens one
at a time is wrong. As vLLM and TGI do, ``IncrementalDetokenizer`` decodes two overlapping windows
of the ids, ``[prefix_offset:read_offset]`` (text already given out) and ``[prefix_offset:]``, and
gives out the difference; a trailing U+FFFD (an unfinished character) is held back until the
token that completes it arrives, or until the request ends.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5          # prompt tokens decoded before the first output token (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    """Text deltas of one request's generated tokens.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
        prompt_ids: the prompt's token ids; its last few give the first output token its context
            (its leading space).
        skip_special_tokens: leave special tokens out of the text.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int, final: bool = False) -> str:
        """Append one generated token; returns the text it completes (maybe ``""``).

        ``final``: the request ends with this token; text held back for an unfinished character is
        given out now (with its U+FFFD)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and (final or not text.endswith(REPLACEMENT)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""
