"""Every shipped plan records the command that made it, and the MoH plans are made again bit for bit
by theirs (``headwise fit moh``) on the real model."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from headwise.plans import PLANS_DIR as PLANS
SHIPPED = sorted(PLANS.glob("*.json")) + sorted((PLANS / "baselines").glob("*.json"))
MOH = sorted(PLANS.glob("smollm2-135m-moh*.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_plan_records_the_command_that_made_it(path):
    from headwise.cli import build_parser

    command = json.loads(path.read_text())["calibration"].get("command")
    assert isinstance(command, str) and command.startswith("headwise "), f"{path.name} records no command"
    build_parser().parse_args(shlex.split(command)[1:])          # a command of today's CLI


@pytest.mark.slow
@pytest.mark.real_model
def test_moh_plans_refit_bit_for_bit_with_their_command(tmp_path):
    """Run the recorded ``headwise fit moh`` command (output and cache moved to ``tmp_path``; about
    5 minutes on one thread): every plan's heads equal the shipped ones and every router tensor is within
    1e-3 of its largest entry (bit for bit on the machine that made them)."""
    from headwise.cli import main

    commands = {json.loads(p.read_text())["calibration"]["command"] for p in MOH}
    assert len(commands) == 1 and len(MOH) == 3, "the MoH plans were made by one command"
    argv = shlex.split(commands.pop())[1:]
    out = argv.index("--out") + 1
    argv[out] = str(tmp_path / Path(argv[out]).name)
    threads = torch.get_num_threads()
    try:
        assert main(argv + ["--cache-dir", str(tmp_path / "cache")]) == 0
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    for path in MOH:
        shipped, made = json.loads(path.read_text()), json.loads((tmp_path / path.name).read_text())
        assert made["layers"] == shipped["layers"]                   # the same heads, kinds and routing
        # The same routers. Bit for bit on the machine that made them; another CPU model's BLAS
        # kernels round differently (measured: this test's sha256 differs on a new VM at the
        # commit that made the plans), so the tensors are compared to fp32 rounding.
        want, got = load_file(path.with_suffix(".safetensors")), load_file((tmp_path / path.name).with_suffix(".safetensors"))
        assert sorted(got) == sorted(want)
        worst = {name: float((got[name] - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-12))
                 for name in want}
        assert max(worst.values()) <= 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


V3 = [p for p in sorted(PLANS.glob("*.json"))
      if (json.loads(p.read_text())["calibration"].get("budget") or {}).get("tolerance") is not None]


@pytest.mark.parametrize("path", V3, ids=[p.stem for p in V3])
def test_every_v3_plan_keeps_its_density_at_every_budget_length_up_to_its_model_context(path):
    """A shipped calibrator-v3 plan (a budget tolerance recorded) keeps ``density * N`` of the KV within
    the tolerance at every budget length from ``strict_from`` on, recomputed from its heads (no model
    needed), and its budget lengths reach the context of the model it was made for (32k for Qwen2.5)."""
    from headwise.plan import load_plan

    plan = load_plan(path)
    budget = plan.calibration["budget"]
    density, tolerance = plan.calibration["density"], budget["tolerance"]
    assert max(budget["lengths"]) == plan.model.max_length
    checked = [n for n in budget["lengths"] if n >= budget["strict_from"]]
    assert len(checked) >= 3
    for n in checked:
        assert abs(plan.density(n) / density - 1.0) <= tolerance + 1e-9, (n, plan.density(n))
        assert plan.density(n) == pytest.approx(budget["density"][str(n)])


def test_the_qwen_plans_are_shipped_with_their_heatmaps_and_keep_their_density_from_4k_to_32k():
    from headwise.plan import load_plan

    path = PLANS / "qwen2.5-coder-0.5b-d25.json"
    plan = load_plan(path)
    assert path.with_suffix(".png").is_file()
    assert (plan.model.name, plan.model.num_layers, plan.model.num_kv_heads, plan.model.max_length) == \
        ("Qwen2.5-Coder-0.5B-Instruct", 24, 2, 32768)
    assert plan.prefill == "dense"
    for n in (4096, 8192, 16384, 32768):
        assert abs(plan.density(n) - 0.25) <= 0.0025, (n, plan.density(n))
    # even windows: the ranked heads dense, every other head one window (d25: retrieval scores; d50: the
    # gates the MILP d25 kept in baselines records)
    d50 = load_plan(PLANS / "qwen2.5-coder-0.5b-d50.json")
    milp = load_plan(PLANS / "baselines" / "qwen2.5-coder-0.5b-d25-milp.json")
    assert d50.calibration["long_heads"]["gates"] == milp.calibration["long_heads"]["gates"]
    assert all(abs(d50.density(n) - 0.50) <= 0.005 for n in (4096, 8192, 16384, 32768))
    for even, method, dense in ((plan, "retrieval+even", 6), (d50, "gates+even", 16)):
        heads = [h for layer in even.layers for h in layer]
        assert even.calibration["method"] == method and sum(h.kind == "dense" for h in heads) == dense
        assert len({h for h in heads if h.kind == "window"}) == 1
