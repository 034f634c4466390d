"""Cache for calibrator v2: gate-training samples with their dense targets, and trained gates.

Files are npz under ``root/<model>-gates-<data>/``: ``L<length>-s<index>.npz`` (``input_ids``,
``positions``, ``target``) and ``gates-<settings>.npz`` (``gates``, ``importance``, ``history``
as JSON text). A second calibration at another density reuses both and only re-solves.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..plan import ModelInfo
from .checkpointing import GATES_AUTO, CheckpointPolicy
from .gates import GateResult, GateSample, dense_targets, train_gates
from .recall_data import RecallBuilder, recall_key


@dataclass(frozen=True)
class GateSettings:
    """Everything that decides trained gates besides the model and data."""

    lengths: tuple[int, ...]
    samples: int
    steps: int
    lr: float
    l1: float
    sink: int
    window: int
    seed: int

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class GateStore:
    """Gate samples and trained gates of one model on one recall data set."""

    def __init__(self, model, root: str | os.PathLike | None = None, *, facts: int = 8, seed: int = 0,
                 checkpoint: CheckpointPolicy = GATES_AUTO):
        from .store import default_cache_root

        self.info = ModelInfo.of(model)
        self.checkpoint = checkpoint     # which training steps run with gradient checkpointing
        self.facts, self.seed = facts, seed
        self.directory = Path(root or default_cache_root()) / f"{self.info.fingerprint[:16]}-gates-{recall_key(facts, seed)}"

    def sample_path(self, length: int, index: int) -> Path:
        return self.directory / f"L{length}-s{index:03d}.npz"

    def samples(self, model, tokenizer, lengths: list[int], count: int) -> list[GateSample]:
        """``count`` samples per length with dense targets, computing (and caching) what is missing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        todo = [(n, i) for n in lengths for i in range(count) if not self.sample_path(n, i).is_file()]
        if todo:
            builder = RecallBuilder(tokenizer, self.facts, self.seed)
            for n, i in tqdm(todo, desc="dense targets", unit="sample"):
                s = builder.build(n, i)
                target = dense_targets(model, s.input_ids.to(model.device), s.positions.to(model.device))
                tmp = self.sample_path(n, i).with_suffix(".tmp.npz")
                np.savez_compressed(tmp, input_ids=s.input_ids[0].numpy().astype(np.int64),
                                    positions=s.positions.numpy().astype(np.int64),
                                    target=target.cpu().numpy().astype(np.float32),
                                    depths=np.array(s.depths, dtype=np.float64))
                tmp.rename(self.sample_path(n, i))
        out = []
        for n in lengths:
            for i in range(count):
                with np.load(self.sample_path(n, i), allow_pickle=False) as f:
                    out.append(GateSample(torch.from_numpy(f["input_ids"])[None].to(model.device),
                                          torch.from_numpy(f["positions"]).to(model.device),
                                          torch.from_numpy(f["target"]).to(model.device)))
        return out

    def gates_path(self, settings: GateSettings) -> Path:
        return self.directory / f"gates-{settings.key()}.npz"

    def gates(self, model, tokenizer, settings: GateSettings) -> tuple[GateResult, bool]:
        """Trained gates for ``settings`` (loaded when cached). Returns ``(result, computed_now)``."""
        path = self.gates_path(settings)
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                return GateResult(f["gates"], f["importance"], json.loads(str(f["history"])),
                                  float(f["seconds"])), False
        started = time.perf_counter()
        samples = self.samples(model, tokenizer, list(settings.lengths), settings.samples)
        targets_seconds = time.perf_counter() - started
        bar = tqdm(total=settings.steps, desc="training gates", unit="step")

        def progress(step, record):
            bar.set_postfix_str(f"L={record['length']} distill={record['distill']:.2e} "
                                f"gates>0.5={record['gates_above_half']}")
            bar.update()

        result = train_gates(model, samples, sink=settings.sink, window=settings.window, steps=settings.steps,
                             lr=settings.lr, l1=settings.l1, seed=settings.seed, progress=progress,
                             checkpoint=self.checkpoint)
        bar.close()
        result.seconds += targets_seconds
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, gates=result.gates, importance=result.importance, history=np.array(json.dumps(result.history)),
                 seconds=np.float64(result.seconds), settings=np.array(json.dumps(asdict(settings))))
        tmp.rename(path)
        return result, True
