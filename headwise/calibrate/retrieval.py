"""Retrieval heads: which KV heads copy a distant fact, read from where their attention points while
the dense model recites it (``headwise calibrate --method retrieval``).

Wu et al. (2024, "Retrieval Head Mechanistically Explains Long-Context Factuality") score a head by
how often its most-attended token is the token the model is copying out of a needle. Here the
samples are the gates' recall samples (``data.recall``: ledger entries at every depth of a prose
haystack, all asked back, the answer teacher-forced), and at each position that predicts a value
token every query head's attention over the context is read:

- ``entry_mass [layers, Hkv]``: the attention weight on the whole ledger entry being recited (its
  key, its value and the words between: what a window head would no longer see), the largest over
  the KV head's query heads, averaged over positions and samples;
- ``copy_mass``: the same on the copied token alone (the value token in its entry);
- ``top1``: how often the copied token is the most attended one (Wu et al.'s score), the largest
  over the query heads.

``--retrieval-score`` picks which of ``entry`` (default) and ``copy`` ranks; the other two break
ties and are recorded in the plan.

One dense forward per sample and no training, so this ranking costs seconds where the gates cost
minutes; the gates rank by the heads' joint effect on the answer, this one by what each head reads.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..plan import ModelInfo
from .capture import observing
from .select import ranked
from .store import Store


@dataclass(frozen=True)
class RetrievalSettings:
    """What decides the scores besides the model and the recall data: sample lengths, samples per
    length, facts per sample, seed."""

    lengths: tuple[int, ...]
    samples: int
    facts: int
    seed: int


SCORES = ("entry", "copy")
FIELDS = ("entry_mass", "copy_mass", "top1")


@dataclass
class RetrievalScores:
    """Per KV head ``[layers, Hkv]`` float64: ``entry_mass``, ``copy_mass``, ``top1``; ``positions``:
    copy positions read (over every sample); ``seconds``: time to compute."""

    entry_mass: np.ndarray
    copy_mass: np.ndarray
    top1: np.ndarray
    positions: int
    seconds: float = 0.0

    def ranking(self, score: str = "entry") -> list[tuple[int, int]]:
        """KV heads ``(layer, head)`` from most to least retrieving by ``score`` (``entry``: entry mass,
        ties by copy mass; ``copy``: copy mass, ties by entry mass), then top-1 rate, then
        ``(layer, head)``."""
        if score not in SCORES:
            raise ValueError(f"retrieval score must be one of {', '.join(SCORES)}, got {score!r}.")
        first, second = (self.entry_mass, self.copy_mass) if score == "entry" else (self.copy_mass, self.entry_mass)
        L, H = first.shape
        return ranked({(l, h): (float(first[l, h]), float(second[l, h]), float(self.top1[l, h]))
                       for l in range(L) for h in range(H)}, highest=True)


def copy_attention(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, sources: torch.Tensor,
                   entries: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of the query heads at ``positions`` on the entries they recite and the tokens they copy.

    Args:
        query: ``[H, T, D]`` after RoPE; key: ``[Hkv, T, D]`` (``H`` a multiple of ``Hkv``).
        positions: ``[P]`` query positions (int64); sources: ``[P]`` the copied token's position;
            entries: ``[P, 2]`` ``[start, end)`` of the entry holding it; all before the query.
        scale: softmax scale.

    Returns:
        ``(entry_mass, copy_mass, top1)``, each ``[Hkv, P]`` float32: per KV head the largest, over its
        query heads, of the causal softmax weight on the entry, on the source, and of "the source is
        the argmax" (0 or 1).
    """
    H, T, D = query.shape
    Hkv = key.shape[0]
    group = H // Hkv
    q = query[:, positions].float().view(Hkv, group, -1, D)                        # [Hkv, G, P, D]
    scores = (q @ key.float().transpose(-1, -2)[:, None]) * scale                   # [Hkv, G, P, T]
    future = torch.arange(T, device=query.device) > positions[:, None]              # [P, T]
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    index = sources.view(1, 1, -1, 1).expand(Hkv, group, -1, 1)
    copy = probs.gather(-1, index)[..., 0]                                          # [Hkv, G, P]
    top1 = (probs.argmax(-1) == sources).float()                                    # [Hkv, G, P]
    inside = (torch.arange(T, device=query.device) >= entries[:, :1]) & \
             (torch.arange(T, device=query.device) < entries[:, 1:])                # [P, T]
    entry = (probs * inside).sum(-1)                                                # [Hkv, G, P]
    return entry.amax(1), copy.amax(1), top1.amax(1)


@torch.no_grad()
def retrieval_scores(model, samples) -> RetrievalScores:
    """Mean copy attention per KV head over ``samples`` (``data.recall.RecallSample`` with sources):
    one dense forward each through transformers' sdpa, the attention at the copy positions
    recomputed from each layer's queries and keys. Positions whose source is unknown (``-1``) are
    left out; no known source at all raises."""
    info = ModelInfo.of(model)
    sums = torch.zeros(len(FIELDS), info.num_layers, info.num_kv_heads, dtype=torch.float64)
    started, total = time.perf_counter(), 0
    for sample in samples:
        known = sample.sources >= 0
        positions, sources = sample.positions[known].to(model.device), sample.sources[known].to(model.device)
        entries = sample.entries[known].to(model.device)
        if not len(positions):
            continue

        def observe(layer, query, key, value, output, scaling):
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            for i, part in enumerate(copy_attention(query[0], key[0], positions, sources, entries, scale)):
                sums[i, layer] += part.sum(-1).double().cpu()

        with observing(model, observe, name="headwise_retrieval"):
            model(input_ids=sample.input_ids.to(model.device), use_cache=False)
        total += len(positions)
    if not total:
        raise ValueError("no recall sample had a copy position with a known source; the tokenizer splits "
                         "the ledger values differently in the entries and the answers.")
    means = (sums / total).numpy()
    return RetrievalScores(*means, positions=total, seconds=time.perf_counter() - started)


class RetrievalStore:
    """Retrieval scores of one model on one recall data set, in a ``store.Store``
    (``scores-<settings>.npz``): a calibration at another density loads them."""

    def __init__(self, model, root=None, *, facts: int = 8, seed: int = 0):
        from ..data.recall import recall_description

        info = ModelInfo.of(model)
        self.store = Store.of(root, info.fingerprint, "retrieval", {"data": recall_description(facts), "seed": seed})

    def path(self, settings: RetrievalSettings):
        from .store import settings_key

        return self.store.path(f"scores-{settings_key(asdict(settings))}.npz")

    def scores(self, model, tokenizer, settings: RetrievalSettings) -> tuple[RetrievalScores, bool]:
        """Scores for ``settings`` (loaded when kept). Returns ``(scores, computed_now)``."""
        from tqdm.auto import tqdm

        from ..data.recall import RecallBuilder

        file = self.path(settings).name
        if self.store.has(file):
            f = self.store.load_arrays(file)
            return RetrievalScores(*(f[name] for name in FIELDS), positions=int(f["positions"]),
                                   seconds=float(f["seconds"])), False
        builder = RecallBuilder(tokenizer, settings.facts, settings.seed)
        todo = [(n, i) for n in settings.lengths for i in range(settings.samples)]
        samples = (builder.build(n, i) for n, i in tqdm(todo, desc="retrieval heads", unit="sample"))
        result = retrieval_scores(model, samples)
        self.store.save_arrays(file, **{name: getattr(result, name) for name in FIELDS},
                               positions=np.int64(result.positions), seconds=np.float64(result.seconds))
        return result, True
