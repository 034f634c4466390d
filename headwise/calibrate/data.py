"""Calibration data: long real prose, an instruction about it, and the model's own greedy answer.

The prose is CPython's ``pydoc_data.topics`` (English reference text shipped with every Python,
~465k characters), cut into passages at deterministic offsets. Each sample is exactly ``length``
tokens: chat template around ``passage + instruction``, then the dense model's greedy answer
(``answer_tokens`` tokens, or fewer when it ends early; then the passage is extended at its start
by the missing tokens so the sample still has ``length`` tokens). The calibration loss is the
cross-entropy of those answer tokens only.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass

import torch

INSTRUCTIONS = (
    "Summarize the text above in two sentences.",
    "What is the main topic of the text above? Explain briefly.",
    "Which Python feature does the text above describe, and what does it do?",
    "Write one question a reader could answer from the text above, then answer it.",
)
_PLACEHOLDER = "\u2063HEADWISE_CONTENT\u2063"


@dataclass(frozen=True)
class CalibrationSample:
    """One sample: ``input_ids`` ``[1, length]`` int64; answer tokens start at ``answer_start``."""

    input_ids: torch.Tensor
    answer_start: int
    length: int
    offset: int
    instruction: str


def corpus_text() -> str:
    """The prose: every ``pydoc_data.topics`` entry, in sorted topic order, blank-line separated."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def data_description() -> dict:
    """What the data is, for the plan's ``calibration`` block and the profile cache key."""
    text = corpus_text()
    return {"source": "pydoc_data.topics (CPython reference prose)",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "characters": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "instructions": list(INSTRUCTIONS), "targets": "dense model's own greedy answers"}


def data_key(answer_tokens: int, seed: int) -> str:
    """Short stable hash of everything that decides the samples' prompts (not the model)."""
    payload = json.dumps({**data_description(), "answer_tokens": answer_tokens, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _template_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the user content in the model's chat template."""
    messages = [{"role": "user", "content": _PLACEHOLDER}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = _PLACEHOLDER + "\nAnswer:"
    before, after = text.split(_PLACEHOLDER)
    bos = []
    wants_bos = getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
    if wants_bos and not (tokenizer.bos_token and before.startswith(tokenizer.bos_token)):
        bos = [tokenizer.bos_token_id]          # GGUF-derived tokenizers may not put it in the template
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    return bos + encode(before), encode(after)


class SampleBuilder:
    """Builds calibration samples for one model and tokenizer (corpus tokenized once)."""

    def __init__(self, model, tokenizer, answer_tokens: int = 32, seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.answer_tokens, self.seed = answer_tokens, seed
        self.corpus = tokenizer(corpus_text(), add_special_tokens=False).input_ids
        self.before, self.after = _template_parts(tokenizer)
        self._encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731

    def offsets(self, length: int, count: int) -> list[int]:
        """Deterministic passage end offsets into the tokenized corpus for ``count`` samples."""
        rng = random.Random(f"{self.seed}:{length}")
        if length + self.answer_tokens >= len(self.corpus):
            raise ValueError(f"calibration length {length} is longer than the corpus of {len(self.corpus)} tokens; "
                             "use shorter lengths.")
        return [rng.randrange(length + self.answer_tokens, len(self.corpus)) for _ in range(count)]

    def _prompt(self, end: int, passage_tokens: int, instruction: str) -> list[int]:
        passage = self.corpus[end - passage_tokens:end]
        return self.before + passage + self._encode("\n\n" + instruction) + self.after

    @torch.no_grad()
    def build(self, length: int, index: int, end: int) -> CalibrationSample:
        """Sample ``index`` at ``length`` tokens whose passage ends at corpus token ``end``."""
        instruction = INSTRUCTIONS[index % len(INSTRUCTIONS)]
        fixed = len(self._prompt(end, 0, instruction))
        passage = length - self.answer_tokens - fixed
        if passage < 16:
            raise ValueError(f"calibration length {length} leaves no room for a passage; use lengths >= 256.")
        prompt = torch.tensor([self._prompt(end, passage, instruction)], device=self.model.device)
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=self.answer_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        answer = out[0, prompt.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        if eos in answer:
            answer = answer[:answer.index(eos) + 1]
        passage += self.answer_tokens - len(answer)          # keep the sample exactly `length` tokens
        ids = self._prompt(end, passage, instruction) + answer
        return CalibrationSample(torch.tensor([ids], device=self.model.device), length - len(answer), length, end,
                                 instruction)
