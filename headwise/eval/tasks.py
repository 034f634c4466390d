"""Offline long-context task generators (deterministic by seed, sized with the model's tokenizer).

Every generator returns ``Sample``s whose prompt has at most ``length`` tokens and at least
99% of it. Generation prompts are chat-formatted; ``depth`` is where the asked needle sits, as a
fraction of the haystack in front of it.

- ``passkey``: a number in repeated filler text (filler is fine here: the task is pure retrieval).
- ``niah``: several "special magic number" needles in real prose, one asked (RULER multi-key).
- ``kv``: a JSON object of random UUID pairs, the value of one key asked (lost-in-the-middle).
- ``vt``: chains of ``VAR X = ...`` assignments in real prose, all names of one value asked (RULER).
- ``perplexity``: real prose documents, scored by loglikelihood.
"""

from __future__ import annotations

import random
import string
import uuid
from dataclasses import dataclass, field

from .fitting import count_tokens, fit_units, render_chat
from ..data.prose import tokenized_prose


@dataclass(frozen=True)
class Sample:
    """One task instance.

    ``prompt`` is the full model input (chat-formatted for generation tasks, the raw document for
    perplexity); ``answers`` must all appear in the model's answer; ``needle`` is the inserted
    text holding the asked answer (empty for perplexity); ``num_tokens`` is ``prompt``'s length.
    """

    task: str
    prompt: str
    answers: tuple[str, ...]
    depth: float | None
    num_tokens: int
    needle: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"task": self.task, "prompt": self.prompt, "answers": list(self.answers), "depth": self.depth,
                "num_tokens": self.num_tokens, "needle": self.needle, **self.extra}


def sweep_depths(trials: int) -> list[float]:
    """``trials`` needle depths spread evenly over ``(0, 1)``: ``(i + 0.5) / trials``."""
    return [(i + 0.5) / trials for i in range(trials)]


def _rng(task: str, length: int, seed: int, index: int) -> random.Random:
    return random.Random(f"headwise-{task}-{length}-{seed}-{index}")


def _snap(text: str, pos: int) -> int:
    """The sentence or line boundary nearest to character ``pos`` (within 120 chars), else a space."""
    pos = max(0, min(len(text), pos))
    if pos in (0, len(text)):
        return pos
    best = None
    for mark in (". ", ".\n", "\n"):
        for cand in (text.rfind(mark, max(0, pos - 120), pos), text.find(mark, pos, pos + 120)):
            if cand >= 0:
                cut = cand + len(mark)
                if best is None or abs(cut - pos) < abs(best - pos):
                    best = cut
    if best is None:
        space = text.rfind(" ", 0, pos)
        best = space + 1 if space >= 0 else pos
    return best


def insert_at_depths(haystack: str, needles: list[tuple[float, str]], char_at=None) -> str:
    """Put each ``(depth, text)`` needle at the boundary nearest the character ``char_at(depth)``
    (default ``depth * len(haystack)``; prose passes its token offsets so depth counts tokens).

    Positions are taken on the original haystack, so needles do not shift each other; needles
    at the same boundary keep their list order.
    """
    char_at = char_at or (lambda d: round(d * len(haystack)))
    cuts = [(_snap(haystack, char_at(d)), i, text) for i, (d, text) in enumerate(needles)]
    out, last = [], 0
    for cut, _, text in sorted(cuts):
        piece = haystack[last:cut]
        out.append(piece)
        sep_before = "" if not piece or piece[-1].isspace() else " "
        out.append(sep_before + text + " ")
        last = cut
    out.append(haystack[last:])
    return "".join(out)


# ---- passkey --------------------------------------------------------------------------------
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\n\nWhat is the pass key? Answer with the number only."


def passkey(tokenizer, length: int, trials: int, seed: int = 0, depths: list[float] | None = None) -> list[Sample]:
    """Passkey retrieval, one sample per depth (``depths`` or ``sweep_depths(trials)``)."""
    words = PASSKEY_FILLER.split()
    samples = []
    for i, depth in enumerate(depths if depths is not None else sweep_depths(trials)):
        key = str(_rng("passkey", length, seed, i).randint(10000, 99999))
        needle = PASSKEY_NEEDLE.format(key=key)

        def build(k: int) -> str:
            filler = " ".join(words[j % len(words)] for j in range(k))
            return render_chat(tokenizer, PASSKEY_INTRO + insert_at_depths(filler, [(depth, needle)]) + PASSKEY_QUESTION)

        _, prompt, n = fit_units(tokenizer, length, build, max_units=2 * length)
        samples.append(Sample("passkey", prompt, (key,), depth, n, needle))
    return samples


# ---- multi-key needle in a haystack (real prose) ---------------------------------------------
NIAH_KEYS = ("apple", "river", "copper", "lantern", "meadow", "falcon", "violet", "harbor", "pepper", "glacier",
             "orchid", "thunder", "canyon", "marble", "saffron", "walrus", "compass", "ember", "quartz", "tundra",
             "willow", "zephyr", "biscuit", "cobalt", "dolphin", "fjord", "granite", "hazel", "igloo", "jasmine")
NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n\n")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("\n\nWhat is the special magic number for {key} mentioned in the provided text? "
                 "Answer with the number only.")


def _haystack_prompt(tokenizer, prose, rng, length: int, placed, intro: str, question: str) -> tuple[str, int]:
    """Chat prompt of about ``length`` tokens: ``intro``, ``prose`` with ``placed`` statements
    ``[(depth, text)]`` inserted at their depths, then ``question``. Returns ``(prompt, tokens)``."""
    start = prose.random_start(rng, length)

    def build(k: int) -> str:
        hay = insert_at_depths(prose.slice(start, k), placed, lambda d: prose.char_at(start, k, d))
        return render_chat(tokenizer, intro + hay + question)

    _, prompt, n = fit_units(tokenizer, length, build, max_units=length)
    return prompt, n


def niah(tokenizer, length: int, trials: int, seed: int = 0, needles: int = 4,
         depths: list[float] | None = None) -> list[Sample]:
    """Multi-key needle-in-a-haystack over real prose: ``needles`` keys, the one at ``depth`` asked."""
    prose = tokenized_prose(tokenizer)
    samples = []
    for i, depth in enumerate(depths if depths is not None else sweep_depths(trials)):
        rng = _rng("niah", length, seed, i)
        keys = rng.sample(NIAH_KEYS, needles)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        others = [rng.uniform(0.02, 0.98) for _ in keys[1:]]
        texts = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        placed = [(depth, texts[0])] + list(zip(others, texts[1:]))
        prompt, n = _haystack_prompt(tokenizer, prose, rng, length, placed, NIAH_INTRO,
                                     NIAH_QUESTION.format(key=keys[0]))
        samples.append(Sample("niah", prompt, (values[0],), depth, n, texts[0]))
    return samples


# ---- key-value retrieval (UUID pairs) -------------------------------------------------------------
KV_INTRO = ("Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n")
KV_QUESTION = '\n\nKey: "{key}"\nWhat is the value of this key? Answer with the value only.'
# Separators between pairs (JSON whitespace), each one token longer than the previous with
# SmolLM2's tokenizer (measured): the fine size control below one pair (~70 tokens).
KV_SEPARATORS = (", ", ",\n") + tuple("," + " \n" * k for k in range(1, 12))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _kv_json(pairs: list[tuple[str, str]], upgrades: int) -> str:
    """JSON object text; ``upgrades`` raises separators one level at a time, first to last."""
    gaps = max(0, len(pairs) - 1)
    parts = []
    for j, (k, v) in enumerate(pairs):
        parts.append(f'"{k}": "{v}"')
        if j < gaps:
            level = min(len(KV_SEPARATORS) - 1, upgrades // gaps + (j < upgrades % gaps)) if gaps else 0
            parts.append(KV_SEPARATORS[level])
    return "{" + "".join(parts) + "}"


def kv(tokenizer, length: int, trials: int, seed: int = 0, depths: list[float] | None = None) -> list[Sample]:
    """Key-value retrieval: as many random UUID pairs as fit, the key at ``depth`` asked."""
    samples = []
    for i, depth in enumerate(depths if depths is not None else sweep_depths(trials)):
        rng = _rng("kv", length, seed, i)
        pool = [(_uuid(rng), _uuid(rng)) for _ in range(length // 40 + 2)]

        def build_with(k: int, upgrades: int) -> tuple[str, tuple[str, str]]:
            pairs = pool[:max(1, k)]
            asked = pairs[round(depth * (len(pairs) - 1))]
            body = KV_INTRO + _kv_json(pairs, upgrades) + KV_QUESTION.format(key=asked[0])
            return render_chat(tokenizer, body), asked

        count, _, _ = fit_units(tokenizer, length, lambda k: build_with(k + 1, 0)[0], max_units=len(pool) - 1)
        pairs = count + 1
        max_upgrades = (len(KV_SEPARATORS) - 1) * max(0, pairs - 1)
        upgrades, prompt, n = fit_units(tokenizer, length, lambda u: build_with(pairs, u)[0], max_units=max_upgrades)
        asked = build_with(pairs, upgrades)[1]
        samples.append(Sample("kv", prompt, (asked[1],), depth, n, f'"{asked[0]}": "{asked[1]}"',
                              {"num_pairs": pairs}))
    return samples


# ---- variable tracking (RULER) ------------------------------------------------------------------
VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
VT_QUESTION = ("\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
               "Answer with the variable names only, separated by commas.")


def vt(tokenizer, length: int, trials: int, seed: int = 0, hops: int = 4, chains: int = 2,
       depths: list[float] | None = None) -> list[Sample]:
    """Variable tracking: ``chains`` chains of ``hops + 1`` assignments in prose; the first
    assignment of the asked chain sits at ``depth``, its later hops between there and the end."""
    prose = tokenized_prose(tokenizer)
    samples = []
    for i, depth in enumerate(depths if depths is not None else sweep_depths(trials)):
        rng = _rng("vt", length, seed, i)
        names: list[str] = []
        while len(names) < chains * (hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        values = rng.sample(range(10000, 99999), chains)
        placed = []
        for c in range(chains):
            chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
            statements = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {chain[h]} = VAR {chain[h - 1]}."
                                                              for h in range(1, hops + 1)]
            first = depth if c == 0 else rng.uniform(0.02, 0.5)
            step = (0.98 - first) / (hops + 1)
            placed += [(first + h * step, s) for h, s in enumerate(statements)]
        asked = tuple(names[:hops + 1])
        prompt, n = _haystack_prompt(tokenizer, prose, rng, length, placed, VT_INTRO, VT_QUESTION.format(value=values[0]))
        samples.append(Sample("vt", prompt, asked, depth, n, placed[0][1]))
    return samples


# ---- long-document perplexity -------------------------------------------------------------------
NESTED_DOCS_UP_TO = 16384
def perplexity(tokenizer, length: int, trials: int, seed: int = 0) -> list[Sample]:
    """``trials`` real-prose documents of ``length`` tokens each, from seeded corpus offsets.

    Document ``i`` starts at the same offset for every length up to 16k tokens, so a shorter
    document is the beginning of a longer one and perplexities compare across lengths.
    """
    prose = tokenized_prose(tokenizer)
    samples = []
    for i in range(trials):
        start = prose.random_start(_rng("perplexity", 0, seed, i), max(length, NESTED_DOCS_UP_TO) + 64)
        _, text, n = fit_units(tokenizer, length, lambda k: prose.slice(start, k), max_units=length + 64)
        samples.append(Sample("perplexity", text, (), None, n))
    return samples


GENERATORS = {"passkey": passkey, "niah": niah, "kv": kv, "vt": vt, "perplexity": perplexity}


def generate(task: str, tokenizer, length: int, trials: int, seed: int = 0) -> list[Sample]:
    """Samples of one task by name (see ``GENERATORS``)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(GENERATORS)}.")
    return GENERATORS[task](tokenizer, length, trials, seed=seed)


__all__ = ["Sample", "GENERATORS", "generate", "sweep_depths", "insert_at_depths", "count_tokens"]
