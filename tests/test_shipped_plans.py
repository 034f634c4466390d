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
