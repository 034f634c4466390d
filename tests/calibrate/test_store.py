"""``calibrate.store``: one folder per model, work and settings; whole files; npz, safetensors and
JSON read back as written (never pickle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headwise.calibrate.store import Store, settings_key


def test_settings_name_the_folder_and_are_recorded(tmp_path):
    a = Store.of(tmp_path, "f" * 64, "moh", {"length": 1024, "seed": 0})
    assert a.directory == Store.of(tmp_path, "f" * 64, "moh", {"seed": 0, "length": 1024}).directory
    others = [Store.of(tmp_path, "e" * 64, "moh", {"length": 1024, "seed": 0}),
              Store.of(tmp_path, "f" * 64, "lightning", {"length": 1024, "seed": 0}),
              Store.of(tmp_path, "f" * 64, "moh", {"length": 2048, "seed": 0})]
    assert len({a.directory, *(s.directory for s in others)}) == 4
    assert a.directory.name.startswith("f" * 16 + "-moh-")
    assert not a.directory.exists()                                   # nothing written until work is saved
    a.save_json("notes.json", {"x": [1, 2]})
    assert json.loads((a.directory / "settings.json").read_text()) == {"length": 1024, "seed": 0}
    assert a.load_json("notes.json") == {"x": [1, 2]}
    assert settings_key({"b": 1, "a": 2}) == settings_key({"a": 2, "b": 1}) and len(settings_key({})) == 12


def test_arrays_and_tensors_round_trip_whole(tmp_path):
    store = Store.of(tmp_path, "0" * 64, "test", {})
    assert not store.has("a.npz")
    store.save_arrays("a.npz", x=np.arange(6.0).reshape(2, 3), text=np.array("hi"))
    got = store.load_arrays("a.npz")
    np.testing.assert_array_equal(got["x"], np.arange(6.0).reshape(2, 3))
    assert str(got["text"]) == "hi"
    store.save_tensors("t.safetensors", {"w": torch.arange(4.0)[::2]}, {"error": "0.5"})
    tensors, meta = store.load_tensors("t.safetensors")
    assert torch.equal(tensors["w"], torch.tensor([0.0, 2.0])) and meta == {"error": "0.5"}
    sub = store.sub("at-x")
    sub.save_arrays("b.npz", compressed=False, y=np.zeros(2))
    assert sub.has("b.npz") and (store.directory / "at-x" / "b.npz").is_file()
    assert sorted(p.name for p in store.directory.iterdir()) == ["a.npz", "at-x", "settings.json", "t.safetensors"]
    store.save_arrays("o.npz", o=np.array([{"a": 1}], dtype=object))   # numpy pickles object arrays...
    with pytest.raises(ValueError, match="allow_pickle"):                  # ...which the store never loads
        store.load_arrays("o.npz")
