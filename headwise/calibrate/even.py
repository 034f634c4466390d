"""Calibrator v3, ``--windows even``: the heads that are not long share what the long heads leave of
the budget evenly, one elastic window each (``sink`` tokens plus ``share * N - sink``), instead of the
MILP sizing every span from the gradient profile.

This is DuoAttention's split (retrieval heads keep everything, streaming heads a sink and a recent
window) with windows that grow with the input, so the budget holds at every length. It needs no
profile: the calibration is the head ranking alone (gates or retrieval scores). Measured on
Qwen2.5-Coder at 8k with the same 8 dense heads: perplexity +5.1% over dense against the MILP's +9.0%
(``benchmarks/results/2026-12-03-even-windows.md``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CalibrationError
from ..kinds import registry
from ..plan import ModelInfo, Plan
from .optimize import budget_bounds


def even_share(density: float, heads: int, long_count: int, elastic_count: int = 0,
               elastic_share: float = 0.5) -> float:
    """Share of ``N`` each remaining head keeps when ``long_count`` heads keep everything and
    ``elastic_count`` keep ``elastic_share * N``, all of ``heads`` within ``density * N * heads``;
    one sentence when nothing is left for them."""
    rest = heads - long_count - elastic_count
    if rest <= 0:
        raise CalibrationError(f"--windows even: {long_count} long and {elastic_count} elastic heads leave none of "
                               f"the model's {heads} KV heads for windows; ask for fewer.")
    share = (density * heads - long_count - elastic_count * elastic_share) / rest
    if share <= 0:
        raise CalibrationError(f"--windows even: {long_count} long and {elastic_count} elastic heads take the whole "
                               f"density {density:g} budget; ask for fewer long heads or a higher density.")
    return share


def preset_head(name: str, info: ModelInfo, *args):
    """The head a kind's plan preset ``name`` makes (``"dense"``; ``"uniform"``: ``density, sink``)."""
    _, make = registry.preset(name)
    return make(info, *args)


def even_windows(info: ModelInfo, density: float, long_heads: np.ndarray, *, sink: int, min_span: int,
                 budget_at: list[int], tolerance: float | None, strict_from: int,
                 elastic_heads: np.ndarray | None = None, elastic_share: float = 0.5,
                 calibration: dict | None = None) -> Plan:
    """The plan whose ``long_heads`` (``[layers, Hkv]`` bool) are dense, ``elastic_heads`` (optional,
    same shape) keep ``elastic_share * N`` and every other head an even share of the rest
    (``even_share``): each window the uniform preset's head (``sink`` tokens, ``alpha = -sink``,
    ``beta = share``) with ``min_span`` as its span floor.

    The budget is checked at ``budget_at``: from ``strict_from`` on, kept KV within ``density * N``
    ``+- tolerance`` (``None``: at most ``density * N``); one sentence when it does not hold (the span
    floor can push short windows above their share).
    """
    long_heads = np.asarray(long_heads, dtype=bool)
    shape = (info.num_layers, info.num_kv_heads)
    if long_heads.shape != shape:
        raise ValueError(f"long_heads has shape {long_heads.shape}, expected {shape}.")
    elastic = np.zeros(shape, dtype=bool) if elastic_heads is None else np.asarray(elastic_heads, dtype=bool)
    share = even_share(density, long_heads.size, int(long_heads.sum()), int(elastic.sum()), elastic_share)
    window = dataclasses.replace(preset_head("uniform", info, share, sink), min_span=int(min_span))
    long_window = dataclasses.replace(preset_head("uniform", info, elastic_share, sink), min_span=int(min_span))
    dense = preset_head("dense", info)
    layers = tuple(tuple(dense if long_heads[l, h] else long_window if elastic[l, h] else window
                         for h in range(info.num_kv_heads)) for l in range(info.num_layers))
    plan = Plan(info, layers, {"method": "gates+even", "density": density, "window_share": share,
                               "budget": {"lengths": budget_at, "tolerance": tolerance, "strict_from": strict_from,
                                          "density": {}},
                               **(calibration or {})})
    checked = [n for n in budget_at if n >= strict_from]
    bounds = budget_bounds(checked, density, long_heads.size, [], tolerance=tolerance, strict_from=strict_from)
    for n in budget_at:
        kept = plan.density(n)
        plan.calibration["budget"]["density"][str(n)] = kept
        if n not in bounds:
            continue
        low, high = bounds[n]
        if not low <= kept * n * long_heads.size <= high:
            raise CalibrationError(f"--windows even: the plan keeps {kept:.4f} of the KV at {n} tokens, outside "
                                   f"density {density:g} +- {tolerance or 0:g} (each window keeps at least sink + "
                                   f"--min-span {min_span}); lower --min-span or --strict-from, or ask for fewer long "
                                   "heads.")
    plan.validate()
    return plan
