"""Fitted heads on disk: one safetensors file per head (tensors + errors in its metadata), resumable."""

from __future__ import annotations

import json
from pathlib import Path

from .fit import FittedHead


class HeadStore:
    """A folder of fitted heads for one set of fitting settings (``settings.json`` records them)."""

    def __init__(self, root: Path, settings: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "settings.json"
        if marker.exists() and json.loads(marker.read_text()) != settings:
            raise SystemExit(f"{marker} was written with other fitting settings; pass another --work-dir.")
        marker.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")

    def path(self, layer: int, head: int) -> Path:
        return self.root / f"L{layer}.H{head}.safetensors"

    def has(self, layer: int, head: int) -> bool:
        return self.path(layer, head).exists()

    def put(self, layer: int, head: int, fitted: FittedHead, seconds: float) -> None:
        from safetensors.torch import save_file

        meta = {"decay": repr(fitted.decay), "error": repr(fitted.error), "train_error": repr(fitted.train_error),
                "seconds": repr(seconds)}
        tmp = self.path(layer, head).with_suffix(".tmp")
        tensors = {"q": fitted.q_weight.contiguous(), "k": fitted.k_weight.contiguous()}
        if fitted.log_mix is not None:
            tensors["log_mix"] = fitted.log_mix.contiguous()
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(self.path(layer, head))          # whole files only: an interrupted write leaves no head

    def _read(self, layer: int, head: int):
        from safetensors import safe_open

        with safe_open(str(self.path(layer, head)), framework="pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}, f.metadata()

    def get(self, layer: int, head: int) -> FittedHead:
        tensors, meta = self._read(layer, head)
        return FittedHead(tensors["q"], tensors["k"], float(meta["decay"]), float(meta["error"]),
                          float(meta["train_error"]), tensors.get("log_mix"))

    def seconds(self, heads) -> float:
        """Total fitting seconds recorded for ``heads``."""
        return sum(float(self._read(*lh)[1]["seconds"]) for lh in heads)
