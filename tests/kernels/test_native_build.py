"""``native_build``: the build cache is keyed by this CPU's instruction sets, and bad ISA names are
refused with one sentence."""

from __future__ import annotations

import pytest

from headwise.kernels import native_build
from headwise.kernels.skinny_linear import native as skinny


def test_cache_key_follows_the_cpu_flags(tmp_path, monkeypatch):
    """A cache shared by two machines with different CPUs (same host name, e.g. containers) must not
    hand one the other's ``-march=native`` build: the CPU's flags are part of the file name's key."""
    monkeypatch.setenv("HEADWISE_CACHE", str(tmp_path))
    build = native_build.load_native.__wrapped__           # past the per-process cache
    for flags in ("fpu sse2 avx avx2 fma", "fpu sse2 avx avx2 fma avx512f avx512bw"):
        monkeypatch.setattr(native_build, "cpu_flags", lambda flags=flags: flags)
        assert build(skinny.SOURCE, "generic") is not None
    assert len(list((tmp_path / "kernels").glob("skinny_linear-generic-*.so"))) == 2


def test_cpu_flags_name_the_vector_extensions_here():
    flags = native_build.cpu_flags().split()
    assert not flags or "sse2" in flags or "asimd" in flags      # x86 or Arm /proc/cpuinfo


def test_unknown_isa_is_refused(monkeypatch):
    monkeypatch.setenv("HEADWISE_NATIVE_ISA", "avx9")
    with pytest.raises(ValueError, match="HEADWISE_NATIVE_ISA='avx9' is not one of"):
        native_build.default_isa()
