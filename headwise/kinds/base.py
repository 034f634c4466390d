"""What a head kind is: its plan spec (``HeadSpec``) and its descriptor (``Kind``).

A kind is one folder ``headwise/kinds/<kind>/`` whose ``__init__.py`` defines ``KIND = Kind(...)``:
the spec class (plan JSON fields, validation, kept KV at length ``N``), and, named as
``"module:attribute"`` strings so nothing heavy loads until it runs, the attention group it runs
under ``patch_model``, the group the engine runs, its optional fitting command, its calibrator
candidates and plan presets, and its capabilities (which runtimes run it, its heatmap mark).
``headwise.kinds.registry`` finds the folders; nothing outside a kind's folder names that kind.

Pure Python (no torch): ``import headwise.plan`` reads specs and descriptors only. The runtime
contracts (``AttentionCall``, ``KindGroup``, ``StatefulGroup``, ``EngineGroup``) are in
``headwise.kinds.call``. See docs/design.md, "Head kinds".
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..errors import PlanError

if TYPE_CHECKING:
    from ..plan import ModelInfo, Plan

#: Runtimes a kind can run in: ``hf`` (``patch_model``), ``engine`` (``headwise.engine.LLM``), ``vllm`` (plugin).
RUNTIMES = ("hf", "engine", "vllm")


@dataclass(frozen=True)
class HeadSpec:
    """One KV head's attention in a plan. Subclasses set ``kind`` and implement ``kept`` and ``kv_rule``."""

    #: the plan JSON tag (equal to the folder's ``Kind.name``)
    kind: ClassVar[str] = ""
    #: False for a head that keeps no KV in the engine's pool (only a recurrent state)
    keeps_kv: ClassVar[bool] = True
    #: fields a plan may leave out (their defaults apply); ``to_json`` leaves them out at their default
    optional_fields: ClassVar[frozenset[str]] = frozenset()

    def kept(self, n: int) -> int:
        """Number of KV entries this head keeps at sequence length ``n``."""
        raise NotImplementedError

    def kv_rule(self) -> tuple:
        """``(sink, alpha, beta, dense[, min_span])``: which KV the cache keeps for this head: the first
        ``sink`` tokens and the last ``clamp(floor(alpha + beta*N), max(1, min_span), N)``, or everything
        when ``dense`` (``rules.KVRule``; consumers read it through ``rules.as_rule``)."""
        raise NotImplementedError(f"head kind {self.kind!r} does not say which KV it keeps (kv_rule).")

    @property
    def keeps_everything(self) -> bool:
        """The head reads and keeps every token at every length (its ``kv_rule`` is dense)."""
        return bool(self.kv_rule()[3])

    def state_bytes(self, head_dim: int, group_size: int) -> int:
        """Bytes of constant-size decode state this head holds besides its KV (0 for softmax kinds)."""
        return 0

    def memory_bytes(self, n: int, head_dim: int, kv_bytes: int = 2) -> int:
        """Decode memory of this KV head at length ``n``: kept K and V at ``kv_bytes`` per value,
        plus its constant state (``state_bytes`` with one query head per KV head)."""
        return 2 * self.kept(n) * head_dim * kv_bytes + self.state_bytes(head_dim, 1)

    def required_weights(self, info: "ModelInfo", layer: int, head: int) -> dict[str, tuple[int, ...]]:
        """Tensors (name -> shape) this head needs from the plan's safetensors file (none by default)."""
        return {}

    @classmethod
    def plan_summary(cls, plan: "Plan") -> str | None:
        """One line ``headwise plan show`` prints about this kind's heads in ``plan`` (``None``: nothing)."""
        return None

    def to_json(self) -> dict[str, Any]:
        fields = {f.name: f for f in dataclasses.fields(self)}
        return {"kind": self.kind, **{k: v for k, v in dataclasses.asdict(self).items()
                                      if not (k in self.optional_fields and v == fields[k].default)}}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "HeadSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - data.keys() - cls.optional_fields)
        if missing:
            raise PlanError(f"{where}: {cls.kind!r} head is missing field(s) {missing}.")
        extra = sorted(data.keys() - names - {"kind"})
        if extra:
            raise PlanError(f"{where}: {cls.kind!r} head has unknown field(s) {extra}.")
        spec = cls(**{n: data[n] for n in names if n in data})
        spec.validate(where)
        return spec

    def validate(self, where: str, max_length: int | None = None) -> None:
        """Raise ``PlanError`` with one sentence if a field is out of range."""


def resolve(target: str) -> Any:
    """The object a ``"package.module:attribute"`` string names (imported on first use)."""
    module, _, attribute = target.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class Kind:
    """Everything headwise knows about one head kind (``KIND`` in its folder's ``__init__.py``).

    Fields naming code are ``"module:attribute"`` strings, imported only when that code runs.

    Attributes:
        name: the plan JSON tag (``spec.kind``).
        spec: the ``HeadSpec`` subclass.
        attention: the group class ``patch_model`` runs for this kind's heads of one layer:
            ``factory(layer_idx, heads, specs, weights) -> KindGroup`` (``headwise.kinds.call``).
            Heads of kinds naming the same target run as one group.
        engine: the engine's group factory, same signature, ``-> EngineGroup``; ``None``: the
            engine refuses plans with this kind.
        fit: module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``: the
            ``headwise fit <name>`` command that fits this kind's parameters (``None``: nothing to fit).
        candidates: ``callable(lengths, **options) -> list[HeadSpec]``: the heads of this kind the
            calibrator may choose from (``None``: the calibrator never picks this kind).
        presets: ``dict`` of plan presets this kind provides, ``name -> callable(info, *args) -> HeadSpec``
            (every head of the plan), e.g. ``"dense"`` or ``"uniform"`` (``Plan.preset``).
        example: ``callable(info, weights) -> HeadSpec``: a valid head of this kind for any model
            (``info``: ``ModelInfo``; ``weights``: the name prefix for its fitted tensors, whose shapes
            ``required_weights`` gives), so contract tests cover every kind without a list.
        vllm: the vLLM plugin runs this kind's heads.
        mark: letter drawn on this kind's heads in plan heatmaps ("" none).
        description: one line: what the head keeps and computes.
    """

    name: str
    spec: type[HeadSpec]
    attention: str
    engine: str | None = None
    fit: str | None = None
    candidates: str | None = None
    presets: str | None = None
    example: str | None = None
    vllm: bool = False
    mark: str = ""
    description: str = ""

    def __post_init__(self):
        if not self.name or self.name != self.spec.kind:
            raise ValueError(f"kind {self.name!r} must be named like its spec's kind tag {self.spec.kind!r}.")

    @property
    def runtimes(self) -> tuple[str, ...]:
        """Runtimes that run this kind, in ``RUNTIMES`` order."""
        return tuple(r for r, ok in zip(RUNTIMES, (True, self.engine is not None, self.vllm)) if ok)

    @property
    def fit_command(self) -> str | None:
        """The shell command that fits this kind's tensors (``None`` when it has none)."""
        return f"headwise fit {self.name}" if self.fit else None

    def group_factory(self) -> Callable:
        return resolve(self.attention)

    def engine_factory(self) -> Callable:
        if self.engine is None:
            raise ValueError(f"the engine cannot run {self.name!r} heads; use patch_model for this plan or remove "
                             "those heads.")
        return resolve(self.engine)

    def fit_module(self):
        if self.fit is None:
            raise ValueError(f"{self.name!r} heads have no parameters to fit.")
        return importlib.import_module(self.fit)

    def candidate_heads(self, lengths: list[int], **options) -> list[HeadSpec]:
        return [] if self.candidates is None else list(resolve(self.candidates)(lengths, **options))

    def example_head(self, info: "ModelInfo", weights: str) -> HeadSpec:
        if self.example is None:
            raise ValueError(f"kind {self.name!r} has no example head; give its descriptor an `example`.")
        return resolve(self.example)(info, weights)

    def plan_presets(self) -> dict[str, Callable]:
        return {} if self.presets is None else dict(resolve(self.presets))
