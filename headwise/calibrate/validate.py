"""Calibrator v3 (approach ii): one validation score for a whole plan, language modelling and
retrieval together, measured on held-out calibration data.

The MILP sizes spans from the gradient profile, and the gates pick the dense heads; neither says how
many heads should be dense, elastic or short. ``--select`` solves one plan per ``long:elastic`` split
and keeps the one whose measured loss on a **validation split** is lowest. The split is drawn with
another seed from the same sources as the calibration samples (so its passages and facts differ
from the profiled ones, though a passage may overlap a profiled one in the corpus), at one length:

- ``recall``: calibration recall samples (archive notes inserted at random depths, a question, the
  dense model's greedy answer): retrieval;
- ``summary``: calibration summary samples (an instruction about the whole passage): local answers;
- ``prose``: plain corpus passages, the last quarter scored: language modelling, as perplexity.

Each sample is prefilled densely once; every plan then scores its continuation (the answer tokens or
the last quarter) through the patched model, each token reading what a decode step of the plan
reads (``headwise.patches.prefilled``). A plan's score is its mean **excess NLL over dense** in nats
per token, averaged over the three kinds with equal weight: one number that rises when either
retrieval or language modelling degrades. Dense-prefill plans are scored that way; sparse-prefill
plans run the whole sample through the patched model.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ..data.calibration import SampleBuilder
from ..data.prose import corpus_ids, corpus_slice

KINDS = ("recall", "summary", "prose")
VALIDATION_SEED = 7919          # added to --seed: the split never reuses the profiled samples' draws
PROSE_SCORED = 0.25             # the scored tail of a prose passage


@dataclass
class ValidationItem:
    """One held-out sequence: ``ids`` ``[1, N]``, scored from ``start`` on, its dense prefill
    (``kv`` per layer ``[1, Hkv, start, D]`` and ``last`` logits ``[1, 1, V]``) and dense NLL."""

    kind: str
    ids: torch.Tensor
    start: int
    kv: list = field(repr=False, default_factory=list)
    last: torch.Tensor | None = field(repr=False, default=None)
    dense_nll: float = 0.0


@dataclass
class ValidationSet:
    """Held-out items at one length, each with its dense prefill kept for every plan to reuse."""

    length: int
    items: list[ValidationItem]
    seconds: float = 0.0

    def describe(self) -> dict:
        counts = {k: sum(i.kind == k for i in self.items) for k in KINDS}
        return {"length": self.length, "items": counts, "seed_offset": VALIDATION_SEED,
                "score": "mean over recall / summary / prose of the plan's excess NLL over dense (nats per "
                         "scored token), dense prefill shared, continuation read as decode steps read it",
                "prose_scored": PROSE_SCORED}


@torch.no_grad()
def build_validation(model, tokenizer, length: int, samples: int, *, seed: int = 0,
                     answer_tokens: int = 32) -> ValidationSet:
    """``samples`` calibration samples (recall and summary alternating) and ``samples // 2`` (at least
    one) prose passages of ``length`` tokens, drawn with ``seed + VALIDATION_SEED``; each prefilled
    densely once and its dense continuation NLL measured."""
    started = time.perf_counter()
    builder = SampleBuilder(model, tokenizer, answer_tokens, seed + VALIDATION_SEED)
    items = []
    for index, end in enumerate(builder.offsets(length, samples)):
        sample = builder.build(length, index, end)
        items.append(ValidationItem("recall" if index % 2 == 0 else "summary", sample.input_ids.cpu(),
                                    sample.answer_start))
    corpus = len(corpus_ids(tokenizer))
    rng = random.Random(f"{seed + VALIDATION_SEED}:{length}:prose")
    for _ in range(max(1, samples // 2)):
        ids = corpus_slice(tokenizer, rng.randrange(0, corpus - length), length)
        items.append(ValidationItem("prose", ids, length - int(length * PROSE_SCORED)))
    for item in items:
        _prefill(model, item)
    return ValidationSet(length, items, time.perf_counter() - started)


def _prefill(model, item: ValidationItem) -> None:
    """The item's dense prefill (kept) and the dense model's NLL over its scored tokens."""
    from ..patches.prefilled import kv_of

    ids = item.ids.to(model.device)
    out = model(input_ids=ids[:, :item.start], use_cache=True, logits_to_keep=1)
    item.kv, item.last = kv_of(out.past_key_values), out.logits[:, -1:]
    rest = model(input_ids=ids[:, item.start:], past_key_values=out.past_key_values, use_cache=True).logits
    scored = torch.cat([item.last, rest[:, :-1]], 1).float()
    item.dense_nll = float(torch.nn.functional.cross_entropy(scored[0], ids[0, item.start:]))
    item.kv = [(k[..., :item.start, :].clone(), v[..., :item.start, :].clone()) for k, v in item.kv]


@torch.no_grad()
def validation_score(model, plan, validation: ValidationSet) -> dict:
    """The plan's validation losses: ``{"score": s, "<kind>": excess NLL, "<kind>_nll": NLL}``.

    ``score`` is the mean over the kinds present of the mean excess NLL (plan minus dense, nats per
    scored token) of their items; lower is better, 0 is dense.
    """
    from ..patches import patch_model, unpatch_model
    from ..patches.prefilled import continuation_nll

    excess: dict[str, list[float]] = {k: [] for k in KINDS}
    nll: dict[str, list[float]] = {k: [] for k in KINDS}
    patch_model(model, plan, prefill=plan.prefill)
    try:
        for item in validation.items:
            ids = item.ids.to(model.device)
            if plan.prefill == "dense":
                total, count = continuation_nll(model, item.kv, item.last, ids[:, item.start:], ids.shape[1])
                value = total / count
            else:
                logits = model(input_ids=ids, use_cache=False).logits[0, item.start - 1:-1].float()
                value = float(torch.nn.functional.cross_entropy(logits, ids[0, item.start:]))
            excess[item.kind].append(value - item.dense_nll)
            nll[item.kind].append(value)
    finally:
        unpatch_model(model)
    present = [k for k in KINDS if excess[k]]
    result = {k: sum(excess[k]) / len(excess[k]) for k in present}
    result.update({f"{k}_nll": sum(nll[k]) / len(nll[k]) for k in present})
    result["score"] = sum(result[k] for k in present) / len(present)
    return result
