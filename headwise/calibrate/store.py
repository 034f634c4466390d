"""Profile cache: one npz file per (length, sample), keyed by model fingerprint and data.

A calibration run that stops midway resumes where it left off: samples already on disk are
loaded, not recomputed. Two runs at different densities share one profile.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..plan import ModelInfo
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
                 block: int = 64):
        self.info = ModelInfo.of(model)
        self.answer_tokens, self.seed, self.block = answer_tokens, seed, block
        key = f"{self.info.fingerprint[:16]}-{data_key(answer_tokens, seed)}-b{block}"
        self.directory = Path(root or default_cache_root()) / key

    def path(self, length: int, index: int) -> Path:
        return self.directory / f"L{length}-s{index:03d}.npz"

    def missing(self, lengths: list[int], samples: int) -> list[tuple[int, int]]:
        return [(n, i) for i in range(samples) for n in lengths if not self.path(n, i).is_file()]

    def collect(self, model, tokenizer, lengths: list[int], samples: int) -> dict[int, LengthProfile]:
        """Profile what is missing (progress bar with ETA), then return every length's profile."""
        todo = self.missing(lengths, samples)
        if todo:
            self.directory.mkdir(parents=True, exist_ok=True)
            builder = SampleBuilder(model, tokenizer, self.answer_tokens, self.seed)
            offsets = {n: builder.offsets(n, samples) for n in lengths}
            # work grows ~quadratically with length: weight the bar so its ETA means something
            weight = {n: (n / min(lengths)) ** 2 for n in lengths}
            bar = tqdm(total=sum(weight[n] for n, _ in todo), desc="profiling", unit="work",
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}] {postfix}")
            for n, i in todo:
                bar.set_postfix_str(f"length {n} sample {i}")
                start = time.perf_counter()
                sample = builder.build(n, i, offsets[n][i])
                blocks, signed, loss = profile_sample(model, sample.input_ids, sample.answer_start, self.block)
                self._save(n, i, blocks, signed, loss, time.perf_counter() - start, sample)
                bar.update(weight[n])
            bar.close()
        return {n: self.load(n, samples) for n in lengths}

    def _save(self, length, index, blocks, signed, loss, seconds, sample) -> None:
        target = self.path(length, index)
        tmp = target.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, blocks=blocks, signed=signed, loss=np.float64(loss), seconds=np.float64(seconds),
                            offset=np.int64(sample.offset), answer_start=np.int64(sample.answer_start),
                            input_ids=sample.input_ids[0].cpu().numpy().astype(np.int64))
        tmp.rename(target)

    def load(self, length: int, samples: int) -> LengthProfile:
        """Sum of the first ``samples`` cached samples at ``length``."""
        total, tiles, losses, seconds = 0.0, 0.0, [], 0.0
        for i in range(samples):
            with np.load(self.path(length, i), allow_pickle=False) as f:
                total = total + f["blocks"].astype(np.float64)
                tiles = tiles + np.abs(f["signed"].astype(np.float64))
                losses.append(float(f["loss"]))
                seconds += float(f["seconds"])
        return LengthProfile(length, self.block, total, tiles, samples, float(np.mean(losses)), seconds)


def torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when given (on a busy shared machine fewer can be faster)."""
    if threads:
        torch.set_num_threads(threads)
