"""Shipped plans, installed with the package: ``<model>-<name>.json`` (and its ``.safetensors``) here.

``<model>`` is the model's name in ``headwise.models`` (``smollm2-135m``) and ``<name>`` a short
name without ``-`` (``d25``, ``moh0.75``). A plan spec that is not a file or a preset may name a
shipped plan: the full name (``"smollm2-135m-d25"``) or the short one (``"d25"``), which resolves
to the plan calibrated for the model at hand (found by the fingerprint of its config) and is
refused in one sentence for another model. ``baselines/`` holds superseded plans the benchmarks
compare against; they are not named plans (give their path).

Pure Python: no torch, no transformers (``headwise.plan`` imports this module).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import PlanError

PLANS_DIR = Path(__file__).resolve().parent
BASELINES_DIR = PLANS_DIR / "baselines"


@dataclass(frozen=True)
class ShippedPlan:
    """One plan file of this folder and what its JSON says about itself."""

    name: str              # the file stem: "smollm2-135m-d25"
    short: str             # after the model's name: "d25"
    model: str             # the model's registry name (headwise.models): "smollm2-135m"
    path: Path
    model_name: str        # the plan's model block: "SmolLM2-135M-Instruct"
    fingerprint: str
    kinds: dict            # kind -> number of KV heads
    density: Any           # calibration density, as recorded
    prefill: str
    command: str           # the command that made it


def _read(path: Path) -> ShippedPlan:
    data = json.loads(path.read_text())
    model, _, short = path.stem.rpartition("-")
    kinds: dict[str, int] = {}
    for layer in data["layers"]:
        for head in layer["heads"]:
            kinds[head["kind"]] = kinds.get(head["kind"], 0) + 1
    calibration = data.get("calibration") or {}
    return ShippedPlan(path.stem, short, model, path, data["model"]["name"], data["model"]["fingerprint"],
                       dict(sorted(kinds.items())), calibration.get("density"), data.get("prefill", "sparse"),
                       calibration.get("command", ""))


@lru_cache(maxsize=1)
def shipped() -> tuple[ShippedPlan, ...]:
    """Every named plan shipped with the package, by name."""
    return tuple(_read(p) for p in sorted(PLANS_DIR.glob("*.json")))


def names() -> list[str]:
    return [p.name for p in shipped()]


def locate(name: str, model_name: str | None = None, fingerprint: str | None = None) -> Path | None:
    """The path of the shipped plan ``name`` (full or short name), or ``None`` if none is called so.

    With ``fingerprint`` (of the model at hand, ``ModelInfo.of(model).fingerprint``), a short name
    resolves to the plan made for that model; without it, to the only plan of that short name.
    Raises ``PlanError`` when the name exists only for other models, or is ambiguous.
    """
    found = [p for p in shipped() if name in (p.name, p.short)]
    if not found:
        return None
    if fingerprint is not None:
        mine = [p for p in found if p.fingerprint == fingerprint]
        if not mine:
            made_for = ", ".join(sorted({f"{p.model} ({p.model_name})" for p in found}))
            raise PlanError(f"shipped plan {name!r} is calibrated for {made_for}, not for "
                            f"{model_name or 'this model'}; calibrate a plan for this model with headwise calibrate.")
        found = mine
    if len(found) > 1:
        raise PlanError(f"shipped plan name {name!r} matches {', '.join(p.name for p in found)}; give the full name.")
    return found[0].path


__all__ = ["PLANS_DIR", "BASELINES_DIR", "ShippedPlan", "shipped", "names", "locate"]
