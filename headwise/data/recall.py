"""Gate-training data: facts at every depth of a real-prose haystack, all asked back at the end.

Haystack: the docstrings of CPython's own standard library (modules, classes and functions of
``Lib/*.py`` and ``Lib/*/*.py``, test code left out, docstrings of 200+ characters), a different
text from both the eval suite's haystack and calibrator v1's (``pydoc_data.topics``).

A sample of ``length`` tokens holds ``facts`` ledger entries ("Ledger entry: the walnut crate
weighs 48213 grams.") at stratified depths (one per ``1/facts`` slice of the passage, so every
depth is covered at every length), then a request to state every crate's weight, then the answer
*teacher-forced* with the true values in shuffled order. The distillation positions are those
whose next token is part of a value: the hidden states that must carry a distant fact. No
generation is needed, so samples are cheap; the wording differs from the eval suite's passkey
("pass key"), needle ("special magic number") and v1's ("shelf number ... folder") templates.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import random
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch

from .calibration import LineStarts, chat_parts, encode

FACT = "Ledger entry: the {key} crate weighs {value} grams."
QUESTION = "Using the ledger entries above, state the weight of every crate, one per line."
ANSWER_HEAD = "The {key} crate weighs"
ANSWER_TAIL = " grams.\n"
KEYS = ("walnut", "saddle", "beacon", "thimble", "lagoon", "parsley", "goblet", "trellis", "anvil", "mitten",
        "pylon", "sparrow", "turnip", "vessel", "wicker", "yarrow", "bramble", "cinder", "dune", "flint")


@lru_cache(maxsize=1)
def haystack_text() -> str:
    """Standard-library docstrings (>= 200 characters), in sorted file order, blank-line separated."""
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "*.py")))
    docs = []
    for path in files:
        if "test" in os.path.relpath(path, root) or "site-packages" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue         # a few stdlib files are templates or use another encoding: not prose to read
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc.strip())
    if not docs:
        raise RuntimeError(f"found no standard-library docstrings under {root}; run with a full CPython install.")
    return "\n\n".join(docs)


def recall_description(facts: int) -> dict:
    """What the gate data is, for the plan's ``calibration`` block and the cache key."""
    text = haystack_text()
    return {"source": "CPython standard-library docstrings", "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "characters": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "fact": FACT, "question": QUESTION, "answer": ANSWER_HEAD + " {value}" + ANSWER_TAIL.rstrip(),
            "facts_per_sample": facts, "depths": "one fact per 1/facts slice of the passage",
            "targets": "dense model's final hidden states at the positions predicting each value (teacher-forced)"}


@dataclass(frozen=True)
class RecallSample:
    """``input_ids`` ``[1, length]``; ``positions`` ``[P]`` predicting value tokens; fact depths;
    ``sources`` ``[P]``: for each position, where in the context the token it predicts stands in its
    ledger entry (the token a head retrieving the fact copies), ``-1`` where the entry's tokens of the
    value differ from the answer's (tokenizer merges across the space); ``entries`` ``[P, 2]``: the
    ``[start, end)`` token range of that ledger entry."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    depths: tuple[float, ...]
    sources: torch.Tensor | None = None
    entries: torch.Tensor | None = None


class RecallBuilder:
    """Builds recall samples for one tokenizer (haystack tokenized once)."""

    def __init__(self, tokenizer, facts: int = 8, seed: int = 0):
        if not 1 <= facts <= len(KEYS):
            raise ValueError(f"facts per sample must be in [1, {len(KEYS)}], got {facts}.")
        self.tokenizer, self.facts, self.seed = tokenizer, facts, seed
        self.corpus = encode(tokenizer, haystack_text())
        self.before, self.after = chat_parts(tokenizer)
        self._lines = LineStarts(tokenizer, self.corpus)

    def build(self, length: int, index: int) -> RecallSample:
        """Sample ``index`` at exactly ``length`` tokens (deterministic in seed, length, index)."""
        rng = random.Random(f"recall:{self.seed}:{length}:{index}")
        keys = rng.sample(KEYS, self.facts)
        values = [str(rng.randint(10_000, 99_999)) for _ in keys]
        depths = tuple((i + rng.uniform(0.1, 0.9)) / self.facts for i in range(self.facts))
        asked = list(range(self.facts))
        rng.shuffle(asked)
        answer, spans, value_ids = [], [], {}
        for i in asked:
            answer += encode(self.tokenizer, ANSWER_HEAD.format(key=keys[i]))
            value_ids[i] = encode(self.tokenizer, " " + values[i])
            spans.append((len(answer), len(answer) + len(value_ids[i])))
            answer += value_ids[i] + encode(self.tokenizer, ANSWER_TAIL)
        question = encode(self.tokenizer, "\n\n" + QUESTION)
        facts = [encode(self.tokenizer, FACT.format(key=k, value=v) + "\n") for k, v in zip(keys, values)]
        fixed = len(self.before) + sum(map(len, facts)) + len(question) + len(self.after) + len(answer)
        passage = length - fixed
        if passage < 16 * self.facts:
            raise ValueError(f"length {length} leaves no room for a passage around {self.facts} facts; "
                             "use longer lengths or fewer facts.")
        if passage + 128 >= len(self.corpus):
            raise ValueError(f"length {length} is longer than the haystack of {len(self.corpus)} tokens; "
                             "use shorter lengths.")
        start = rng.randrange(0, len(self.corpus) - passage - 128)
        end = start + passage
        ids, at, fact_at = list(self.before), start, []
        for depth, fact in zip(depths, facts):
            cut = max(at, self._lines.at_or_after(start + int(depth * passage), end))
            ids += self.corpus[at:cut]
            fact_at.append(len(ids))
            ids += fact
            at = cut
        ids += self.corpus[at:end] + question + self.after
        offset = len(ids)
        ids += answer
        positions = [offset + p - 1 for a, b in spans for p in range(a, b)]
        sources, entries = [], []
        for i in asked:
            found = _find(facts[i], value_ids[i])
            sources += [fact_at[i] + found + k if found >= 0 else -1 for k in range(len(value_ids[i]))]
            entries += [(fact_at[i], fact_at[i] + len(facts[i]))] * len(value_ids[i])
        return RecallSample(torch.tensor([ids]), torch.tensor(positions), depths, torch.tensor(sources),
                            torch.tensor(entries))


def _find(tokens: list[int], part: list[int]) -> int:
    """First index of ``part`` in ``tokens``, ``-1`` when absent."""
    for i in range(len(tokens) - len(part) + 1):
        if tokens[i:i + len(part)] == part:
            return i
    return -1
