"""Sizing prompts to an exact token count with the model's own tokenizer.

A task builds its prompt from a number of haystack *units* (filler words, prose tokens, key-value
pairs); ``fit_units`` finds the largest unit count whose rendered prompt has at most ``length``
tokens. Prompts are chat-formatted when the tokenizer has a chat template, so an instruction-tuned
model answers in its normal format.
"""

from __future__ import annotations

from typing import Callable


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` as the model sees it (no special tokens added: prompts carry their own)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def render_chat(tokenizer, body: str) -> str:
    """``body`` as one user turn followed by the assistant's turn opener (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                             add_generation_prompt=True)
    return body + "\nAnswer:"


def fit_units(tokenizer, length: int, build: Callable[[int], str], max_units: int) -> tuple[int, str, int]:
    """Largest ``k <= max_units`` with ``count_tokens(build(k)) <= length`` (binary search; the
    count grows with ``k``).

    Returns ``(k, build(k), its token count)``. Raises ``ValueError`` when even ``build(0)`` is
    longer than ``length``.
    """
    lo_text = build(0)
    lo_count = count_tokens(tokenizer, lo_text)
    if lo_count > length:
        raise ValueError(f"the task's fixed text alone has {lo_count} tokens, more than the requested {length}; "
                         "ask for a longer context.")
    lo, hi = 0, max_units
    best = (0, lo_text, lo_count)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = build(mid)
        n = count_tokens(tokenizer, text)
        if n <= length:
            lo, best = mid, (mid, text, n)
        else:
            hi = mid - 1
    return best
