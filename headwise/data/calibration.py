"""Calibration data: long real prose, a question about it, and the model's own greedy answer.

The prose is CPython's ``pydoc_data.topics`` (English reference text shipped with every Python,
~465k characters), cut into passages at deterministic offsets. Each sample is exactly ``length``
tokens: chat template around ``passage + instruction``, then the dense model's greedy answer
(``answer_tokens`` tokens, or fewer when it ends early; then the passage is extended at its start
by the missing tokens so the sample still has ``length`` tokens). The calibration loss is the
cross-entropy of those answer tokens only.

Two kinds of sample alternate (even index: recall, odd index: summary):

- **recall**: ``RECALL_FACTS`` short archive notes with a random 5-digit number each are
  inserted at line starts at random depths of the passage; the instruction asks for one of them.
  The answer depends on distant context, so the heads that retrieve it carry the gradient, as with
  MoA's long-range QA data and DuoAttention's passkeys in real essays. (A 135M model cannot quote
  plain lines of the prose back: measured 0/9 at 1k-4k, so the facts are inserted.) Up to
  ``RECALL_ATTEMPTS`` fact draws are tried until the dense model's answer holds the asked value,
  so the gradient points at the fact it read, not at a wrong one. The note and question wording
  differ from the eval suite's passkey and needle templates.
- **summary**: one of ``INSTRUCTIONS`` about the passage as a whole (mostly local evidence).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .prose import corpus_description, corpus_ids

INSTRUCTIONS = (
    "Summarize the text above in two sentences.",
    "What is the main topic of the text above? Explain briefly.",
    "Which Python feature does the text above describe, and what does it do?",
    "Write one question a reader could answer from the text above, then answer it.",
)
RECALL_FACT = "(Archive note: the shelf number of the {key} folder is {value}.)"
RECALL_QUESTION = "What is the shelf number of the {key} folder? Answer with the number only."
RECALL_ANSWER_PREFIX = "The shelf number of the {key} folder is"   # in the prompt: targets are the digits
RECALL_KEYS = ("amber", "birch", "cedar", "delta", "ferry", "garnet", "heron", "indigo", "juniper", "kestrel",
               "linden", "mosaic", "nutmeg", "onyx", "pewter", "quill", "raven", "sorrel", "tamarind", "umber")
RECALL_FACTS = 3
RECALL_ATTEMPTS = 8     # fact draws tried per recall sample until the dense model answers it right
_PLACEHOLDER = "\u2063HEADWISE_CONTENT\u2063"


@dataclass(frozen=True)
class CalibrationSample:
    """One sample: ``input_ids`` ``[1, length]`` int64; answer tokens start at ``answer_start``."""

    input_ids: torch.Tensor
    answer_start: int
    length: int
    offset: int
    instruction: str
    facts: tuple[tuple[float, str], ...] = ()
    answer_prefix: str = ""


def data_description() -> dict:
    """What the data is, for the plan's ``calibration`` block and the profile cache key."""
    return {**corpus_description(),
            "instructions": list(INSTRUCTIONS), "recall_fact": RECALL_FACT,
            "recall_question": RECALL_QUESTION,
            "recall_answer_prefix": RECALL_ANSWER_PREFIX, "recall_facts": RECALL_FACTS,
            "recall_attempts": RECALL_ATTEMPTS,
            "mix": "even samples recall, odd samples summary",
            "targets": "dense model's own greedy answers"}


def chat_parts(tokenizer) -> tuple[list[int], list[int]]:
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
    return bos + encode(tokenizer, before), encode(tokenizer, after)


def encode(tokenizer, text: str) -> list[int]:
    """``text`` as token ids, no special tokens added."""
    return tokenizer(text, add_special_tokens=False).input_ids


class LineStarts:
    """Where lines start in a token sequence, to insert text at a line start near a depth."""

    def __init__(self, tokenizer, ids: list[int]):
        ends_line = {t: "\n" in tokenizer.decode([t]) for t in set(ids)}
        self._newline = [ends_line[t] for t in ids]

    def at_or_after(self, i: int, end: int) -> int:
        """The first line start in ``[i, min(i + 128, end))`` (``i`` itself when there is none)."""
        for j in range(max(i, 1), min(i + 128, end)):
            if self._newline[j - 1] and not self._newline[j]:
                return j
        return i


class SampleBuilder:
    """Builds calibration samples for one model and tokenizer (corpus tokenized once)."""

    def __init__(self, model, tokenizer, answer_tokens: int = 32, seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.answer_tokens, self.seed = answer_tokens, seed
        self.corpus = list(corpus_ids(tokenizer))
        self.before, self.after = chat_parts(tokenizer)
        self._lines = LineStarts(tokenizer, self.corpus)

    def offsets(self, length: int, count: int) -> list[int]:
        """Deterministic passage end offsets into the tokenized corpus for ``count`` samples."""
        rng = random.Random(f"{self.seed}:{length}")
        if length + self.answer_tokens >= len(self.corpus):
            raise ValueError(f"calibration length {length} is longer than the corpus of {len(self.corpus)} tokens; "
                             "use shorter lengths.")
        return [rng.randrange(length + self.answer_tokens, len(self.corpus)) for _ in range(count)]

    def task(self, length: int, index: int, attempt: int = 0) -> tuple[str, tuple[tuple[float, str], ...], str, str]:
        """Sample ``index``'s instruction, inserted ``(depth, text)`` facts, the start of the
        assistant's answer placed in the prompt, and the asked value (the last three empty for summaries)."""
        if index % 2:
            return INSTRUCTIONS[(index // 2) % len(INSTRUCTIONS)], (), "", ""
        rng = random.Random(f"{self.seed}:{length}:{index}:recall:{attempt}")
        keys = rng.sample(RECALL_KEYS, RECALL_FACTS)
        values = [str(rng.randint(10_000, 99_999)) for _ in keys]
        facts = tuple((rng.uniform(0.02, 0.98), RECALL_FACT.format(key=k, value=v)) for k, v in zip(keys, values))
        return RECALL_QUESTION.format(key=keys[0]), facts, RECALL_ANSWER_PREFIX.format(key=keys[0]), values[0]

    def _prompt(self, end: int, passage_tokens: int, instruction: str,
                facts: tuple[tuple[float, str], ...] = (), answer_prefix: str = "") -> list[int]:
        """Chat prompt: passage of ``passage_tokens`` corpus tokens ending at ``end``, each fact inserted
        at the first line start at or after its depth, the instruction, then ``answer_prefix``."""
        start = end - passage_tokens
        cuts = sorted((self._lines.at_or_after(start + int(depth * passage_tokens), end), text) for depth, text in facts)
        passage, at = [], start
        for cut, text in cuts:
            passage += self.corpus[at:cut] + encode(self.tokenizer, text + "\n")
            at = cut
        passage += self.corpus[at:end]
        prefix = encode(self.tokenizer, answer_prefix) if answer_prefix else []
        return self.before + passage + encode(self.tokenizer, "\n\n" + instruction) + self.after + prefix

    def _greedy(self, prompt: list[int]) -> list[int]:
        """The dense model's greedy answer (at most ``answer_tokens``, cut after end-of-sequence)."""
        ids = torch.tensor([prompt], device=self.model.device)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.answer_tokens,
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        answer = out[0, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        return answer[:answer.index(eos) + 1] if eos in answer else answer

    @torch.no_grad()
    def build(self, length: int, index: int, end: int) -> CalibrationSample:
        """Sample ``index`` at ``length`` tokens whose passage ends at corpus token ``end``."""
        for attempt in range(RECALL_ATTEMPTS if index % 2 == 0 else 1):
            instruction, facts, prefix, value = self.task(length, index, attempt)
            fixed = len(self._prompt(end, 0, instruction, facts, prefix))
            passage = length - self.answer_tokens - fixed
            if passage < 16:
                raise ValueError(f"calibration length {length} leaves no room for a passage; use lengths >= 256.")
            answer = self._greedy(self._prompt(end, passage, instruction, facts, prefix))
            if value in self.tokenizer.decode(answer):
                break                   # recall: keep facts the dense model retrieves (else the last try)
        passage += self.answer_tokens - len(answer)          # keep the sample exactly `length` tokens
        ids = self._prompt(end, passage, instruction, facts, prefix) + answer
        return CalibrationSample(torch.tensor([ids], device=self.model.device), length - len(answer), length, end,
                                 instruction, facts, prefix)
