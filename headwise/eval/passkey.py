"""Passkey retrieval: a random number hidden at a chosen depth of filler text, asked for at the end.

Prompts are sized to an exact token count with the model's tokenizer and rendered with the
model's chat template, so an instruction-tuned model answers in its normal format.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? Answer with the number only."


@dataclass(frozen=True)
class PasskeySample:
    """One prompt (chat-formatted text), its answer, where the needle sits, and its token count."""

    prompt: str
    answer: str
    depth: float
    num_tokens: int


def _render(tokenizer, body: str) -> str:
    messages = [{"role": "user", "content": body}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return body + "\nAnswer:"


def passkey_samples(tokenizer, length: int, depths: list[float], seed: int = 0) -> list[PasskeySample]:
    """Passkey prompts of ``length`` tokens (±1 filler sentence), one per depth in ``[0, 1]``.

    Deterministic for a given ``seed``. ``depth`` is the fraction of the filler placed before
    the needle.
    """
    rng = random.Random(seed)
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    per_filler = count(FILLER * 8) / 8
    samples = []
    for depth in depths:
        key = str(rng.randint(10000, 99999))
        needle = NEEDLE.format(key=key)
        fixed = count(_render(tokenizer, INTRO + needle + QUESTION))
        n_fill = max(0, round((length - fixed) / per_filler))
        while True:   # correct the estimate so the prompt does not exceed `length`
            before = round(n_fill * depth)
            prompt = _render(tokenizer, INTRO + FILLER * before + needle + FILLER * (n_fill - before) + QUESTION)
            n = count(prompt)
            if n <= length or n_fill == 0:
                break
            n_fill -= max(1, round((n - length) / per_filler))
        samples.append(PasskeySample(prompt=prompt, answer=key, depth=depth, num_tokens=n))
    return samples
