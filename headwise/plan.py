"""Plans: which attention every KV head of a model runs, as versioned JSON.

A plan is tied to one model architecture (by a fingerprint of its config) and holds, per layer,
one head spec per KV head. Head kinds are folders under ``headwise/kinds/`` found by
``headwise.kinds.registry``; this module reads their specs and descriptors only (no attention
code, no kernels, no transformers), so ``import headwise.plan`` stays light.

Kinds with fitted parameters (``lightning`` feature maps, ``moh`` routers) keep them in
``Plan.weights``, saved beside the JSON as ``<plan>.safetensors``; the JSON records that file's
sha256 and loading refuses a missing or changed file (never pickle).

A plan spec is a ``Plan``, a JSON path, a preset a kind provides: ``"dense"``,
``"uniform:<density>[:<sink>]"`` (``Plan.preset``), or the name of a plan shipped with the package
(``headwise.plans``): ``"d25"`` for the model at hand, or the full ``"smollm2-135m-d25"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import plans as shipped_plans
from .errors import PlanError
from .kinds import registry
from .kinds.base import HeadSpec
from .kinds.rules import check_number

FORMAT = "headwise.plan/1"
PREFILL_MODES = ("sparse", "dense")

def head_from_json(data: Any, where: str) -> HeadSpec:
    """One head spec from its JSON object (its ``kind`` names the kind folder)."""
    if not isinstance(data, dict):
        raise PlanError(f"{where}: a head must be a JSON object, got {type(data).__name__}.")
    return registry.get(data.get("kind"), where).spec.from_json(data, where)


@dataclass(frozen=True)
class ModelInfo:
    """The architecture a plan is made for."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_length: int
    fingerprint: str

    @classmethod
    def of(cls, model_or_config: Any) -> "ModelInfo":
        """Describe a ``transformers`` model (or its config)."""
        config = getattr(model_or_config, "config", model_or_config)
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_heads = config.num_attention_heads
        fields = {
            "model_type": getattr(config, "model_type", ""),
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "intermediate_size": getattr(config, "intermediate_size", None),
            "num_layers": config.num_hidden_layers,
            "num_heads": num_heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or num_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        }
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        name = getattr(config, "headwise_name", None) or os.path.basename(
            str(getattr(config, "name_or_path", "") or "").rstrip("/")) or fields["model_type"]
        return cls(name=name, num_layers=fields["num_layers"], num_heads=num_heads,
                   num_kv_heads=fields["num_kv_heads"], head_dim=fields["head_dim"],
                   max_length=getattr(config, "max_position_embeddings", None) or 0, fingerprint=digest)


@dataclass(frozen=True)
class Plan:
    """Per layer, per KV head attention specs for one model.

    ``layers[i][h]`` is the ``HeadSpec`` of KV head ``h`` in layer ``i``. ``prefill`` is how a
    forward with more than one query runs: ``"sparse"`` (every head reads only its sink + window,
    the default) or ``"dense"`` (every head reads everything it has; the cache still keeps only
    the plan's KV afterwards, so decoding follows the plan).
    """

    model: ModelInfo
    layers: tuple[tuple[HeadSpec, ...], ...]
    calibration: dict[str, Any] = field(default_factory=dict)
    prefill: str = "sparse"
    #: fitted tensors of kinds that have them (name -> tensor), saved as ``<plan>.safetensors``
    weights: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, model: Any, *args: Any) -> "Plan":
        """A plan whose every head is the head a kind's preset ``name`` makes for ``model``
        (``Kind.presets``): ``"dense"`` (no arguments), ``"uniform"`` (``density, sink=64, length=None``)."""
        found = registry.preset(name)
        if found is None:
            names = sorted(n for kind in registry.all_kinds() for n in kind.plan_presets())
            raise PlanError(f"unknown plan preset {name!r}; presets are {names}, or give a plan JSON path.")
        kind, make = found
        info = ModelInfo.of(model)
        try:
            head = make(info, *args)
        except TypeError as error:
            raise PlanError(f"plan preset {name!r} of kind {kind.name!r} takes other arguments ({error}).") from None
        bound = inspect.signature(make).bind(info, *args)
        bound.apply_defaults()
        params = dict(list(bound.arguments.items())[1:])          # the preset's own parameters, by name
        plan = cls(info, tuple(tuple(head for _ in range(info.num_kv_heads)) for _ in range(info.num_layers)),
                   {"method": name, **params})
        plan.validate()
        return plan

    @classmethod
    def dense(cls, model: Any) -> "Plan":
        """Every head dense: the patched model computes exactly what the unpatched one does."""
        return cls.preset("dense", model)

    @classmethod
    def uniform(cls, model: Any, density: float, sink: int = 64, length: int | None = None) -> "Plan":
        """StreamingLLM baseline: every head keeps ``sink`` tokens plus one local window.

        With ``length=None`` the window is sized so every head keeps ``density * N`` tokens at
        every length ``N`` (``alpha = -sink, beta = density``); with ``length`` set the window is a
        fixed ``density * length - sink`` tokens (``beta = 0``), the classic StreamingLLM cache.
        """
        return cls.preset("uniform", model, density, sink, length)

    @classmethod
    def from_spec(cls, spec: "Plan | str | os.PathLike", model: Any) -> "Plan":
        """A plan from a ``Plan``, a JSON path, a preset ``"<name>[:<arg>...]"`` (``"dense"``,
        ``"uniform:0.25"``, ``"uniform:0.25:64"``) or a shipped plan's name (``"d25"``: the one made
        for ``model``; ``"smollm2-135m-d25"``), checked against ``model``."""
        if isinstance(spec, Plan):
            plan = spec
        elif spec is None or not isinstance(spec, (str, os.PathLike)):
            raise PlanError(f"a plan must be a Plan, a plan JSON path or a preset such as 'dense' or 'uniform:0.25', "
                            f"got {type(spec).__name__}.")
        else:
            name, *raw = str(spec).split(":")
            found = None if os.path.exists(str(spec)) else registry.preset(name)
            if found is None:
                info = ModelInfo.of(model)
                shipped = None if os.path.exists(str(spec)) else shipped_plans.locate(str(spec), info.name,
                                                                                      info.fingerprint)
                plan = load_plan(shipped or spec)
            else:
                try:
                    args = [int(a) if a.lstrip("-").isdigit() else float(a) for a in raw]
                except ValueError:
                    raise PlanError(f"plan spec {str(spec)!r} must look like '{name}' followed by numbers, e.g. "
                                    "'uniform:0.25' or 'uniform:0.25:64'.") from None
                plan = cls.preset(name, model, *args)
        plan.check_model(model)
        return plan

    # ---- math ---------------------------------------------------------------------------
    @property
    def heads(self) -> list[HeadSpec]:
        return [h for layer in self.layers for h in layer]

    def kept(self, n: int) -> list[list[int]]:
        """Kept KV entries per ``[layer][kv_head]`` at length ``n``."""
        return [[h.kept(n) for h in layer] for layer in self.layers]

    def layer_density(self, n: int) -> list[float]:
        return [sum(h.kept(n) for h in layer) / (n * len(layer)) for layer in self.layers]

    def density(self, n: int) -> float:
        """Mean over all KV heads of ``kept(n) / n``."""
        heads = self.heads
        return sum(h.kept(n) for h in heads) / (n * len(heads))

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        if self.prefill not in PREFILL_MODES:
            raise PlanError(f"plan 'prefill' must be one of {list(PREFILL_MODES)}, got {self.prefill!r}.")
        m = self.model
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            check_number("plan model", name, getattr(m, name), minimum=1, integer=True)
        if m.num_heads % m.num_kv_heads:
            raise PlanError(f"plan model: num_heads {m.num_heads} is not a multiple of num_kv_heads {m.num_kv_heads}.")
        if len(self.layers) != m.num_layers:
            raise PlanError(f"plan has {len(self.layers)} layers but its model block says {m.num_layers}.")
        for i, layer in enumerate(self.layers):
            if len(layer) != m.num_kv_heads:
                raise PlanError(f"plan layer {i} has {len(layer)} heads but the model has {m.num_kv_heads} KV heads.")
            for h, head in enumerate(layer):
                head.validate(f"layer {i} head {h}", m.max_length or None)
                for name, shape in head.required_weights(m, i, h).items():
                    tensor = self.weights.get(name)
                    if tensor is None:
                        raise PlanError(f"layer {i} head {h}: {head.kind!r} head needs tensor {name!r}, which the "
                                        f"plan's weights do not have; {_refit(head)}.")
                    if tuple(tensor.shape) != tuple(shape):
                        raise PlanError(f"layer {i} head {h}: tensor {name!r} has shape {tuple(tensor.shape)} but the "
                                        f"head needs {tuple(shape)}; {_refit(head)}.")

    def check_model(self, model: Any) -> None:
        """Raise ``PlanError`` unless this plan was made for ``model``'s architecture."""
        other = ModelInfo.of(model)
        if (self.model.num_layers, self.model.num_kv_heads) != (other.num_layers, other.num_kv_heads):
            raise PlanError(
                f"plan is for {self.model.num_layers} layers x {self.model.num_kv_heads} KV heads but the model has "
                f"{other.num_layers} x {other.num_kv_heads}; calibrate a plan for this model.")
        if self.model.fingerprint != other.fingerprint:
            raise PlanError(
                f"plan was made for model {self.model.name!r} (fingerprint {self.model.fingerprint[:12]}) but this is "
                f"{other.name!r} (fingerprint {other.fingerprint[:12]}); calibrate a plan for this model.")

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self, weights_file: str | None = None) -> dict[str, Any]:
        """The plan as JSON data; with weights, a ``weights`` block naming their file and sha256."""
        data = {"format": FORMAT, "model": dataclasses.asdict(self.model), "calibration": self.calibration,
                "prefill": self.prefill, "layers": [{"heads": [h.to_json() for h in layer]} for layer in self.layers]}
        if self.weights:
            data["weights"] = {"file": weights_file or "<unsaved>",
                               "sha256": hashlib.sha256(self.weights_bytes()).hexdigest()}
        return data

    def weights_bytes(self) -> bytes:
        """The fitted tensors serialised as safetensors (deterministic bytes)."""
        from safetensors.torch import save

        return save({name: t.detach().contiguous().cpu() for name, t in sorted(self.weights.items())})

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON to ``path``; fitted tensors go to ``path`` with suffix ``.safetensors``."""
        weights_file = None
        if self.weights:
            blob = self.weights_bytes()
            weights_path = Path(path).with_suffix(".safetensors")
            weights_path.write_bytes(blob)
            weights_file = weights_path.name
        with open(path, "w") as f:
            json.dump(self.to_json(weights_file), f, indent=1)
            f.write("\n")

    @classmethod
    def from_json(cls, data: Any, weights: Mapping[str, Any] | None = None) -> "Plan":
        """A validated plan from JSON data; ``weights`` are the tensors of its safetensors file
        (``load_plan`` reads and checks that file)."""
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}.")
        if data.get("format") != FORMAT:
            raise PlanError(f"plan format is {data.get('format')!r} but headwise reads {FORMAT!r}.")
        for key in ("model", "layers"):
            if key not in data:
                raise PlanError(f"plan is missing the {key!r} block.")
        mdata = data["model"]
        names = [f.name for f in dataclasses.fields(ModelInfo)]
        if not isinstance(mdata, dict) or any(n not in mdata for n in names):
            raise PlanError(f"plan 'model' block must have the fields {names}.")
        info = ModelInfo(**{n: mdata[n] for n in names})
        if not isinstance(data["layers"], list):
            raise PlanError("plan 'layers' must be a list with one {'heads': [...]} object per layer.")
        layers = []
        for i, layer in enumerate(data["layers"]):
            if not isinstance(layer, dict) or not isinstance(layer.get("heads"), list):
                raise PlanError(f"plan layer {i} must be an object with a 'heads' list.")
            layers.append(tuple(head_from_json(h, f"layer {i} head {j}") for j, h in enumerate(layer["heads"])))
        if data.get("weights") is not None and weights is None:
            raise PlanError("this plan keeps fitted tensors in a safetensors file beside its JSON; load it with "
                            "headwise.load_plan(path) so that file is read and checked.")
        plan = cls(info, tuple(layers), dict(data.get("calibration") or {}), data.get("prefill", "sparse"),
                   dict(weights or {}))
        plan.validate()
        return plan


def _refit(head: HeadSpec) -> str:
    """What to do about a head's missing or malformed tensors: the kind's ``headwise fit`` command."""
    command = registry.kind_of(head).fit_command
    return f"refit the plan ({command})" if command else "refit the plan"


def load_plan(path: str | os.PathLike, model: Any = None) -> Plan:
    """Read and validate a plan JSON file; with ``model``, also check it was made for that model.

    ``path`` may also name a shipped plan (``"smollm2-135m-d25"``, or ``"d25"``: with ``model``, the
    one made for it), as ``headwise plan list`` shows.
    """
    if not os.path.exists(path):
        info = None if model is None else ModelInfo.of(model)
        shipped = shipped_plans.locate(str(path), info and info.name, info and info.fingerprint)
        path = shipped or path
    try:
        with open(path) as f:
            data = json.load(f, parse_constant=lambda c: float(c))
    except FileNotFoundError:
        raise PlanError(f"plan file {str(path)!r} does not exist (shipped plans: "
                        f"{', '.join(shipped_plans.names())}; presets: 'dense', 'uniform:<density>').") from None
    except IsADirectoryError:
        raise PlanError(f"plan path {str(path)!r} is a directory; give a plan JSON file.") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"plan file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    weights = _read_weights(Path(path), data.get("weights")) if isinstance(data, dict) else None
    plan = Plan.from_json(data, weights)
    if model is not None:
        plan.check_model(model)
    return plan


def _read_weights(plan_path: Path, block: Any) -> dict[str, Any] | None:
    """The tensors of a plan's ``weights`` block, after checking the file's sha256 (no pickle)."""
    if block is None:
        return None
    if not isinstance(block, dict) or not isinstance(block.get("file"), str) or not isinstance(block.get("sha256"), str):
        raise PlanError(f"plan {str(plan_path)!r}: 'weights' must be an object with 'file' and 'sha256' strings.")
    file = plan_path.parent / block["file"]
    if Path(block["file"]).name != block["file"]:
        raise PlanError(f"plan {str(plan_path)!r}: weights file {block['file']!r} must be a file name beside the plan.")
    try:
        blob = file.read_bytes()
    except FileNotFoundError:
        raise PlanError(f"plan {str(plan_path)!r} needs its weights file {str(file)!r}, which does not exist; keep "
                        "the .safetensors file beside the plan JSON.") from None
    if hashlib.sha256(blob).hexdigest() != block["sha256"]:
        raise PlanError(f"weights file {str(file)!r} does not match the sha256 recorded in plan {str(plan_path)!r} "
                        "(it was changed or replaced); refit the plan or restore the original file.")
    from safetensors.torch import load

    return load(blob)


__all__ = ["FORMAT", "PREFILL_MODES", "PlanError", "HeadSpec", "ModelInfo", "Plan", "load_plan", "head_from_json"]
