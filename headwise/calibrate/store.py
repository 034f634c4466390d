"""Profile cache: one npz file per (length, sample), keyed by model fingerprint and data.

A calibration run that stops midway resumes where it left off: samples already on disk are
loaded, not recomputed. Two runs at different densities share one profile.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..plan import ModelInfo
from .checkpointing import PROFILE_AUTO, CheckpointPolicy
from .data import SampleBuilder, data_key
from .profile import profile_sample



@dataclass
class LengthProfile:
    """Profile at one length, summed over ``samples`` samples: ``blocks`` ``[layers, Hkv, nb, nb]``
    float64 tile sums of ``|E|``; ``tiles`` the same shape, ``|sum of E over the tile|`` per sample
    (first-order loss change of dropping the whole tile); mean answer ``loss``; ``seconds`` spent."""

    length: int
    block: int
    blocks: np.ndarray
    tiles: np.ndarray
    samples: int
    loss: float
    seconds: float


def default_cache_root() -> Path:
    from ..models import cache_dir

    return cache_dir() / "profiles"


class ProfileStore:
    """Profiles of one model on one calibration data set, under ``root/<model>-<data>/``."""

    def __init__(self, model, root: str | os.PathLike | None = None, *, answer_tokens: int = 32, seed: int = 0,
                 block: int = 64, checkpoint: CheckpointPolicy = PROFILE_AUTO):
        self.info = ModelInfo.of(model)
        self.checkpoint = checkpoint     # which samples are profiled with gradient checkpointing
        self.answer_tokens, self.seed, self.block = answer_tokens, seed, block
        key = f"{self.info.fingerprint[:16]}-{data_key(answer_tokens, seed)}-b{block}"
        self.directory = Path(root or default_cache_root()) / key

    def path(self, length: int, index: int, plan=None) -> Path:
        """Sample file; profiles taken at a plan live in a sub-folder named by the plan's heads."""
        folder = self.directory if plan is None else self.directory / f"at-{plan_key(plan)}"
        return folder / f"L{length}-s{index:03d}.npz"

    def missing(self, lengths: list[int], samples: int, plan=None) -> list[tuple[int, int]]:
        return [(n, i) for i in range(samples) for n in lengths if not self.path(n, i, plan).is_file()]

    def collect(self, model, tokenizer, lengths: list[int], samples: int) -> dict[int, LengthProfile]:
        """Profile what is missing (progress bar with ETA), then return every length's profile."""
        todo = self.missing(lengths, samples)
        if todo:
            builder = SampleBuilder(model, tokenizer, self.answer_tokens, self.seed)
            offsets = {n: builder.offsets(n, samples) for n in lengths}
            self._profile(model, todo, lengths, lambda n, i: builder.build(n, i, offsets[n][i]), None)
        return {n: self.load(n, samples) for n in lengths}

    def collect_at(self, model, plan, lengths: list[int], samples: int) -> dict[int, LengthProfile]:
        """Profile the same samples as ``collect`` (which must have run) with ``plan``'s banded
        attention, for a refit: ``E`` linearised at the plan instead of at the dense model."""
        todo = self.missing(lengths, samples, plan)
        if todo:
            self._profile(model, todo, lengths, self._stored_sample, plan)
        return {n: self.load(n, samples, plan) for n in lengths}

    def _profile(self, model, todo: list[tuple[int, int]], lengths: list[int], sample_of, plan) -> None:
        """Profile and save every ``(length, index)`` in ``todo``; ``sample_of(length, index)``
        gives the sample. Work grows ~quadratically with length: the bar is weighted so its ETA
        means something."""
        self.path(lengths[0], 0, plan).parent.mkdir(parents=True, exist_ok=True)
        weight = {n: (n / min(lengths)) ** 2 for n in lengths}
        bar = tqdm(total=sum(weight[n] for n, _ in todo), desc="profiling" if plan is None else "profiling at the plan",
                   unit="work", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}] {postfix}")
        for n, i in todo:
            bar.set_postfix_str(f"length {n} sample {i}")
            start = time.perf_counter()
            sample = sample_of(n, i)
            blocks, signed, loss = profile_sample(model, sample.input_ids, sample.answer_start, self.block, plan=plan,
                                                  checkpoint=self.checkpoint.wants(model, sample.input_ids.shape[1]))
            self._save(n, i, blocks, signed, loss, time.perf_counter() - start, sample, plan)
            bar.update(weight[n])
        bar.close()

    def _stored_sample(self, length: int, index: int) -> "_Stored":
        """The sample a dense profile file was taken on."""
        with np.load(self.path(length, index), allow_pickle=False) as f:
            return _Stored(torch.from_numpy(f["input_ids"].astype(np.int64))[None], int(f["answer_start"]),
                           int(f["offset"]))

    def _save(self, length, index, blocks, signed, loss, seconds, sample, plan=None) -> None:
        target = self.path(length, index, plan)
        tmp = target.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, blocks=blocks, signed=signed, loss=np.float64(loss), seconds=np.float64(seconds),
                            offset=np.int64(sample.offset), answer_start=np.int64(sample.answer_start),
                            input_ids=sample.input_ids[0].cpu().numpy().astype(np.int64))
        tmp.rename(target)

    def load(self, length: int, samples: int, plan=None) -> LengthProfile:
        """Sum of the first ``samples`` cached samples at ``length`` (taken at ``plan`` if given)."""
        total, tiles, losses, seconds = 0.0, 0.0, [], 0.0
        for i in range(samples):
            with np.load(self.path(length, i, plan), allow_pickle=False) as f:
                total = total + f["blocks"].astype(np.float64)
                tiles = tiles + np.abs(f["signed"].astype(np.float64))
                losses.append(float(f["loss"]))
                seconds += float(f["seconds"])
        return LengthProfile(length, self.block, total, tiles, samples, float(np.mean(losses)), seconds)


def pooled(profiles: list[LengthProfile]) -> LengthProfile:
    """Profiles of one length taken at different points (dense model, plans), each scaled to unit
    total mass and summed, so every linearisation point weighs the same in the optimiser."""
    first = profiles[0]
    blocks = sum(p.blocks / p.blocks.sum() for p in profiles)
    tiles = sum(p.tiles / p.tiles.sum() for p in profiles)
    return LengthProfile(first.length, first.block, blocks, tiles, first.samples,
                         float(np.mean([p.loss for p in profiles])), sum(p.seconds for p in profiles))


@dataclass
class _Stored:
    """A calibration sample read back from a profile file (what ``_save`` records of it)."""

    input_ids: torch.Tensor
    answer_start: int
    offset: int


def plan_key(plan) -> str:
    """Short digest of a plan's heads (not its calibration notes): names profiles taken at it."""
    heads = [[head.to_json() for head in layer] for layer in plan.layers]
    return hashlib.sha256(json.dumps(heads, sort_keys=True).encode()).hexdigest()[:12]


def torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when given (on a busy shared machine fewer can be faster)."""
    if threads:
        torch.set_num_threads(threads)
