"""Passkey retrieval for the demo: a random number hidden at a chosen depth of filler text.

The generator lives in ``headwise.eval.tasks.passkey`` (sized to the token with the model's
tokenizer, chat-formatted); this module keeps the demo's ``passkey_samples`` interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tasks import passkey


@dataclass(frozen=True)
class PasskeySample:
    """One prompt (chat-formatted text), its answer, where the needle sits, and its token count."""

    prompt: str
    answer: str
    depth: float
    num_tokens: int


def passkey_samples(tokenizer, length: int, depths: list[float], seed: int = 0) -> list[PasskeySample]:
    """Passkey prompts of at most ``length`` tokens (and at least 99% of it), one per depth in ``[0, 1]``.

    Deterministic for a given ``seed``. ``depth`` is the fraction of the filler placed before the needle.
    """
    return [PasskeySample(s.prompt, s.answers[0], s.depth, s.num_tokens)
            for s in passkey(tokenizer, length, len(depths), seed=seed, depths=list(depths))]
