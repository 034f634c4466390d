"""The one resumable store of calibration and fitting work: profiles, gate samples and gates,
fitted linear heads, MoH routers and samples.

A ``Store`` is a folder ``<root>/<model fingerprint>-<name>-<settings key>/`` holding the work of
one model under one set of settings (``settings.json`` records them; the key is a hash of them),
so a run with other settings never reads it, and a run with the same settings resumes from what is
there. Files are written whole (to a temporary name, then renamed), so an interrupted run leaves
no half file. Formats: npz (numpy arrays, read with ``allow_pickle=False``), safetensors (torch
tensors with string metadata) and JSON; never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def settings_key(settings: Any) -> str:
    """12 hex digits of the sha256 of ``settings`` as sorted JSON: names work done under them."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def default_root() -> Path:
    """``$HEADWISE_CACHE/calibration`` (``~/.cache/headwise/calibration`` by default)."""
    from ..models import cache_dir

    return cache_dir() / "calibration"


class Store:
    """Resumable work in ``directory`` under ``settings`` (see the module docstring); make one with
    ``Store.of``."""

    def __init__(self, directory: str | os.PathLike, settings: dict):
        self.directory, self.settings = Path(directory), settings

    @classmethod
    def of(cls, root: str | os.PathLike | None, fingerprint: str, name: str, settings: dict) -> "Store":
        """The store of one model's ``name`` work under ``settings``.

        Args:
            root: parent folder (``None``: ``default_root()``).
            fingerprint: the model's ``ModelInfo.fingerprint``.
            name: what is stored (``"profile"``, ``"gates"``, ``"moh"``, a kind's name, ...).
            settings: JSON-able settings that decide the work besides the model.
        """
        key = settings_key({"fingerprint": fingerprint, "name": name, "settings": settings})
        return cls(Path(root or default_root()) / f"{fingerprint[:16]}-{name}-{key}", settings)

    def sub(self, name: str) -> "Store":
        """A sub-folder for work derived from this store's (e.g. profiles taken at a plan)."""
        return Store(self.directory / name, self.settings)

    def path(self, file: str) -> Path:
        return self.directory / file

    def has(self, file: str) -> bool:
        return self.path(file).is_file()

    def _writing(self, file: str) -> tuple[Path, Path]:
        """``(temporary, final)`` paths of a file about to be written; creates the folder and
        records the settings the first time."""
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / "settings.json"
        if not marker.is_file():
            marker.write_text(json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        final = self.path(file)
        return final.with_name(f".{final.name}.tmp{final.suffix}"), final

    def save_arrays(self, file: str, compressed: bool = True, **arrays: np.ndarray) -> None:
        """Numpy arrays to ``file`` (``.npz``)."""
        tmp, final = self._writing(file)
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)
        tmp.replace(final)

    def load_arrays(self, file: str) -> dict[str, np.ndarray]:
        with np.load(self.path(file), allow_pickle=False) as f:
            return {name: f[name] for name in f.files}

    def save_tensors(self, file: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
        """Torch tensors (and string ``metadata``) to ``file`` (``.safetensors``)."""
        from safetensors.torch import save_file

        tmp, final = self._writing(file)
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(final)

    def load_tensors(self, file: str) -> tuple[dict, dict[str, str]]:
        """``(tensors, metadata)`` of a safetensors file."""
        from safetensors import safe_open

        with safe_open(str(self.path(file)), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})

    def save_json(self, file: str, data: Any) -> None:
        tmp, final = self._writing(file)
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(final)

    def load_json(self, file: str) -> Any:
        return json.loads(self.path(file).read_text())
