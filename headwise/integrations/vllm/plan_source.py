"""Where the vLLM plugin finds its plan, and the checks a plan must pass before vLLM starts.

No vLLM import here: these functions take plain dicts and config objects, so they are tested
without vLLM.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Mapping

from ...kinds import registry
from ...plan import PREFILL_MODES, Plan, PlanError

#: Key of ``--additional-config`` (``LLM(additional_config=...)``) naming the plan.
PLAN_KEY = "headwise_plan"
#: Environment variable naming the plan when ``--additional-config`` does not.
ENV_VAR = "HEADWISE_PLAN"
#: ``--additional-config`` key overriding the plan's prefill mode (``"sparse"`` or ``"dense"``).
PREFILL_KEY = "headwise_prefill"


def check_runnable(plan: Plan) -> None:
    """Raise ``PlanError`` (one sentence) unless every head's kind runs in the vLLM plugin (``Kind.vllm``)."""
    runnable = sorted(k.name for k in registry.all_kinds() if k.vllm)
    for i, layer in enumerate(plan.layers):
        for h, head in enumerate(layer):
            if not registry.kind_of(head).vllm:
                raise PlanError(f"layer {i} head {h} is a {head.kind!r} head, which the vLLM plugin cannot run (it runs "
                                f"{runnable}); serve this plan with headwise.patch_model or the headwise engine instead.")


def plan_spec(additional_config: Any, environ: Mapping[str, str] | None = None) -> str | None:
    """The plan spec for this vLLM run, or ``None`` when none is given (the plugin stays inert).

    Args:
        additional_config: vLLM's ``VllmConfig.additional_config`` (a dict, possibly empty).
        environ: environment to read ``HEADWISE_PLAN`` from (``os.environ`` by default).

    Returns:
        ``additional_config["headwise_plan"]`` when set, else ``$HEADWISE_PLAN`` when set and
        non-empty, else ``None``.
    """
    environ = os.environ if environ is None else environ
    if isinstance(additional_config, Mapping) and additional_config.get(PLAN_KEY) is not None:
        spec = additional_config[PLAN_KEY]
        if not isinstance(spec, (str, os.PathLike)) or not str(spec):
            raise PlanError(f"--additional-config {PLAN_KEY!r} must be a plan path, 'dense' or 'uniform:<density>', "
                            f"got {spec!r}.")
        return str(spec)
    return environ.get(ENV_VAR) or None


def load_plan_for_vllm(spec: str, hf_config: Any, prefill: str | None = None) -> Plan:
    """Load ``spec`` for the model vLLM serves and check the plugin can run every head.

    Args:
        spec: a plan JSON path, ``"dense"`` or ``"uniform:<density>[:<sink>]"``.
        hf_config: vLLM's ``model_config.hf_config`` (a ``transformers`` config).
        prefill: ``"sparse"`` or ``"dense"`` to override the plan's prefill mode (``PREFILL_KEY``).

    Returns:
        The validated ``Plan``.

    Raises:
        PlanError: one sentence: malformed plan, plan for another model, or a head kind the
            plugin cannot run, or a model whose own layers use sliding-window attention.
    """
    plan = Plan.from_spec(spec, hf_config)
    if prefill is not None:
        if prefill not in PREFILL_MODES:
            raise PlanError(f"--additional-config {PREFILL_KEY!r} must be one of {list(PREFILL_MODES)}, got {prefill!r}.")
        plan = replace(plan, prefill=prefill)
    check_runnable(plan)
    text = hf_config.get_text_config(decoder=True) if hasattr(hf_config, "get_text_config") else hf_config
    native = [i for i, t in enumerate(getattr(text, "layer_types", None) or []) if t != "full_attention"]
    if native or getattr(text, "sliding_window", None) not in (None, 0) and getattr(text, "use_sliding_window", True):
        raise PlanError("this model's own layers use sliding-window attention, which the vLLM plugin does not combine "
                        "with a plan; serve a model whose layers all use full attention.")
    return plan


def describe(plan: Plan, spec: str) -> str:
    """One line naming the plan for the start-up log."""
    all_dense = sum(all(h.keeps_everything for h in layer) for layer in plan.layers)
    windowed = sum(not any(h.keeps_everything for h in layer) for layer in plan.layers)
    return (f"plan {spec!r} for {plan.model.name} ({plan.calibration.get('method', 'calibrated')}): density "
            f"{plan.density(4096):.3f} at 4k, {plan.density(8192):.3f} at 8k; {all_dense} of {len(plan.layers)} layers "
            f"all dense (vLLM's own kernel), {windowed} with no dense head; prefill {plan.prefill}")
