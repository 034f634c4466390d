"""Fitted heads -> a plan: choose the heads to convert and write them as ``lightning`` or ``hybrid`` specs + tensors."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..kinds.hybrid import Hybrid
from ..kinds.lightning import Lightning
from ..plan import Plan
from .fit import FittedHead


def head_name(layer: int, head: int) -> str:
    """``"L.H"``: how heads are named on the command line and in the plan's error table."""
    return f"{layer}.{head}"


def choose_heads(errors: dict[tuple[int, int], float], fraction: float | None, max_error: float | None,
                 total_heads: int) -> list[tuple[int, int]]:
    """Heads to convert: lowest held-out error first, at most ``fraction * total_heads`` of them,
    none with an error above ``max_error`` (either bound may be ``None``)."""
    order = sorted(errors, key=lambda lh: (errors[lh], lh))
    if max_error is not None:
        order = [lh for lh in order if errors[lh] <= max_error]
    if fraction is not None:
        order = order[:int(round(fraction * total_heads))]
    return sorted(order)


def convert(base: Plan, fitted: dict[tuple[int, int], FittedHead], heads: list[tuple[int, int]],
            calibration: dict[str, Any], window: int | None = None, sink: int = 0) -> Plan:
    """``base`` with ``heads`` replaced by heads from ``fitted``: ``lightning`` heads, or ``hybrid``
    heads with ``window`` and ``sink`` when ``window`` is set; tensors in ``Plan.weights``."""
    layers = [list(layer) for layer in base.layers]
    weights = dict(base.weights)
    for layer, head in heads:
        fit = fitted[(layer, head)]
        features = 2 * fit.k_weight.shape[-1]
        if window is None:
            name = f"lightning.l{layer}.h{head}"
            layers[layer][head] = Lightning(decay=float(fit.decay), feature_dim=features, weights=name)
        else:
            if fit.log_mix is None:
                raise ValueError(f"head {head_name(layer, head)} was fitted as a lightning head; fit it with the "
                                 "window in place to convert it to a hybrid head.")
            name = f"hybrid.l{layer}.h{head}"
            layers[layer][head] = Hybrid(sink=sink, window=window, decay=float(fit.decay), feature_dim=features,
                                         weights=name)
            weights[f"{name}.log_mix"] = fit.log_mix.contiguous()
        weights[f"{name}.q"] = fit.q_weight.contiguous()
        weights[f"{name}.k"] = fit.k_weight.contiguous()
    plan = dataclasses.replace(base, layers=tuple(tuple(layer) for layer in layers), calibration=calibration,
                               weights=weights)
    plan.validate()
    return plan
