"""Shipped plans are package data found by name (``headwise.plans``), and ``headwise.patched`` undoes
its patch on exit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headwise import PlanError, load_plan, patched
from headwise.patches import is_patched
from headwise.plan import Plan
from headwise.plans import BASELINES_DIR, PLANS_DIR, locate, shipped

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_plan_is_named_after_a_registry_model():
    from headwise.models import MODELS

    plans = shipped()
    assert {"smollm2-135m-d25", "smollm2-135m-d50", "qwen2.5-coder-0.5b-d25", "qwen2.5-coder-0.5b-d50"} <= \
        {p.name for p in plans}
    for p in plans:
        assert p.model in MODELS, f"{p.name}: {p.model!r} is not a headwise.models name"
        assert p.model_name == MODELS[p.model].display_name
        assert "-" not in p.short and p.path.parent == PLANS_DIR
    assert not [p for p in plans if p.path.parent == BASELINES_DIR]        # baselines are not named plans


def test_a_full_name_loads_without_a_model_and_a_short_name_needs_it_only_when_ambiguous():
    path = locate("smollm2-135m-d25")
    assert path == PLANS_DIR / "smollm2-135m-d25.json"
    assert locate("moh0.75") == PLANS_DIR / "smollm2-135m-moh0.75.json"      # one model has MoH plans today
    with pytest.raises(PlanError, match=r"^shipped plan name 'd25' matches qwen2.5-coder-0.5b-d25, "
                                        r"smollm2-135m-d25; give the full name\.$"):
        locate("d25")                                  # two models have a d25: the model decides
    by_name = {p.name: p for p in shipped()}
    assert locate("d25", fingerprint=by_name["smollm2-135m-d25"].fingerprint) == path
    assert locate("d25", fingerprint=by_name["qwen2.5-coder-0.5b-d25"].fingerprint) == \
        PLANS_DIR / "qwen2.5-coder-0.5b-d25.json"
    assert locate("no-such-plan") is None
    assert load_plan("smollm2-135m-moh0.5").weights    # fitted tensors found beside the packaged JSON


def test_a_short_name_is_refused_in_one_sentence_for_another_model(llama):
    with pytest.raises(PlanError, match=r"^shipped plan 'd25' is calibrated for qwen2.5-coder-0.5b "
                                        r"\(Qwen2.5-Coder-0.5B-Instruct\), smollm2-135m \(SmolLM2-135M-Instruct\), "
                                        r"not for .*; calibrate a plan for this model"):
        Plan.from_spec("d25", llama)
    with pytest.raises(PlanError, match="calibrated for smollm2-135m"):
        load_plan("smollm2-135m-d50", llama)


def test_an_unknown_name_lists_the_shipped_plans(llama):
    with pytest.raises(PlanError, match=r"does not exist \(shipped plans: qwen2.5-coder-0.5b-d25, (\S+, )*smollm2-135m-d25, "):
        Plan.from_spec("d26", llama)


def test_plan_list_prints_every_shipped_plan(capsys):
    from headwise.cli import main

    assert main(["plan", "list"]) == 0
    out = capsys.readouterr().out
    for p in shipped():
        assert p.name in out
    assert "8 dense, 82 window" in out                  # d25's heads by kind


def test_plan_show_takes_a_name_and_draws_the_heatmap_here(tmp_path, monkeypatch, capsys):
    from headwise.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["plan", "show", "smollm2-135m-d25", "--lengths", "2048,4096"]) == 0
    out = capsys.readouterr().out
    kept = float(re.search(r"^\s+2048\s+([0-9.]+)$", out, re.M).group(1))
    assert abs(kept / 0.25 - 1) <= 0.01                # d25 keeps 25% (+-1%) at 2k
    assert (tmp_path / "smollm2-135m-d25.png").is_file()


@pytest.mark.real_model
def test_short_and_full_names_give_the_shipped_plan_for_the_embedded_model(real_model):
    model, _ = real_model
    shipped_d25 = load_plan(PLANS_DIR / "smollm2-135m-d25.json")
    assert Plan.from_spec("d25", model) == shipped_d25
    assert Plan.from_spec("smollm2-135m-d25", model) == shipped_d25
    with patched(model, "d25") as m:
        assert m._headwise["runtime"].plan == shipped_d25
    assert not is_patched(model)


def test_patched_undoes_the_patch_on_exit_and_on_error(llama):
    ids = torch.randint(0, llama.config.vocab_size, (1, 24))
    before = llama.config._attn_implementation
    with torch.no_grad():
        reference = llama(ids).logits
        with patched(llama, "uniform:0.25:4") as model:
            assert model is llama and is_patched(llama)
            windowed = llama(ids).logits
        assert not is_patched(llama) and llama.config._attn_implementation == before
        assert torch.equal(llama(ids).logits, reference)
        assert not torch.allclose(windowed, reference)      # the plan did change attention inside
        with pytest.raises(KeyError, match="inside"):
            with patched(llama, "dense"):
                raise KeyError("inside")
        assert not is_patched(llama)


def test_patched_refuses_an_already_patched_model_and_leaves_its_patch(llama):
    from headwise import patch_model, unpatch_model

    patch_model(llama, "dense")
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            with patched(llama, "uniform:0.25"):
                pass
        assert is_patched(llama)
    finally:
        unpatch_model(llama)


def _source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


@pytest.mark.slow
def test_the_wheel_carries_the_named_plans(tmp_path):
    """Build the wheel from this checkout's files, install it (no deps) in a fresh venv that sees this
    environment's packages through a path entry, and load named plans from outside the checkout."""
    import shutil

    source = tmp_path / "src"
    for name in _source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, env=env, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("headwise-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's torch, transformers...: as a plain path entry, after the venv's own packages
    # (its .pth files, such as an editable headwise, are not run)
    import sysconfig
    Path(site, "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, env=env)
    script = ("import headwise, json; from headwise import load_plan; from headwise.plans import shipped; "
              "d25 = load_plan('smollm2-135m-d25'); moh = load_plan('smollm2-135m-moh0.75'); "
              "print(json.dumps({'file': headwise.__file__, 'names': [p.name for p in shipped()], "
              "'d25': round(d25.density(2048), 4), 'moh_tensors': len(moh.weights)}))")
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["file"].startswith(site), found["file"]              # the installed wheel, not the checkout
    assert {p.name for p in shipped()} == set(found["names"])
    assert abs(found["d25"] - 0.25) <= 0.0025 and found["moh_tensors"] > 0      # 25% +- 1% of the KV at 2k
    listing = subprocess.run([str(venv / "bin" / "headwise"), "plan", "list"], capture_output=True, text=True,
                             env=env, cwd=tmp_path)
    assert listing.returncode == 0 and "smollm2-135m-d25" in listing.stdout, listing.stderr
