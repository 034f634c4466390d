"""Build a kernel's C source into a shared library on first use and load it with ctypes.

Native kernels (``*.c`` beside an op's ``native.py``) are compiled with the system C compiler
(``$CC``, else ``cc``/``gcc``) as ``-O3 -march=native -fopenmp`` into ``$HEADWISE_CACHE/kernels/``,
keyed by the hash of the source and every file it ``#include "..."``s (looked up beside it, then in
``kernels/``), the flags and the machine. OpenMP resolves to the ``libgomp`` torch already loaded,
so kernels and torch share one thread pool. A missing compiler or a failed build is logged once and
returns ``None``; the op's ``auto`` backend then runs its torch path.

``isa`` picks what the build targets: ``"native"`` (this CPU, ``-march=native``), ``"no-avx512bf16"``
(this CPU without the AVX512-BF16 instructions), ``"avx2"`` (no AVX-512: the kernels' 8-lane AVX2 + FMA
paths where the CPU has those) or ``"generic"`` (no AVX-512, AVX2 or FMA: the portable loops). The
environment variable ``HEADWISE_NATIVE_ISA`` sets the default; the fallbacks exist so a test can run
the code a CPU without those instructions runs. The cache key holds this CPU's instruction-set flags,
so a cache shared by machines with different CPUs never loads code the CPU cannot run.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger("headwise.kernels")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> str:
    """This CPU's instruction-set flags (``/proc/cpuinfo``; empty where there is none): ``-march=native``
    builds for them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


#: Extra compiler flags of each ``isa`` (after ``-march=native``).
ISA_FLAGS = {"native": [], "no-avx512bf16": ["-mno-avx512bf16"], "avx2": ["-mno-avx512f"],
             "generic": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}
_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def default_isa() -> str:
    """``$HEADWISE_NATIVE_ISA`` or ``"native"``; one sentence when it names no known target."""
    isa = os.environ.get("HEADWISE_NATIVE_ISA", "native")
    if isa not in ISA_FLAGS:
        raise ValueError(f"HEADWISE_NATIVE_ISA={isa!r} is not one of {sorted(ISA_FLAGS)}; unset it or pick one.")
    return isa


def _sources(source: Path, seen: dict[Path, bytes] | None = None) -> dict[Path, bytes]:
    """``source`` and every file it includes with quotes, recursively (beside it, else in ``kernels/``)."""
    seen = {} if seen is None else seen
    if source in seen:
        return seen
    seen[source] = code = source.read_bytes()
    for name in _INCLUDE.findall(code):
        for base in (source.parent, Path(__file__).parent):
            found = (base / name.decode()).resolve()
            if found.is_file():
                _sources(found, seen)
                break
    return seen


#: A native kernel's return code when it could not allocate scratch memory (1 means it refused its arguments).
OUT_OF_MEMORY = 2


def native_error(rc: int, refused: str) -> RuntimeError:
    """The error for a native kernel's nonzero return code ``rc``; ``refused`` is the sentence for a refusal."""
    if rc == OUT_OF_MEMORY:
        return RuntimeError("a native kernel could not allocate its scratch memory; free memory or use the torch path.")
    return RuntimeError(refused)


@lru_cache(maxsize=None)
def load_native(source: Path, isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled library of ``source`` for ``isa`` (default ``default_isa()``), or ``None`` when it
    cannot be built here (logged)."""
    from ..models import cache_dir

    isa = default_isa() if isa is None else isa
    if isa not in ISA_FLAGS:
        raise ValueError(f"isa {isa!r} is not one of {sorted(ISA_FLAGS)}.")
    compiler = _compiler()
    if compiler is None:
        logger.warning("%s: no C compiler found; the native kernel is off and the torch path runs", source.name)
        return None
    header = Path(__file__).with_name("native.h")
    code = b"".join(_sources(Path(source).resolve()).values()) + header.read_bytes()
    flags = ISA_FLAGS[isa]
    key = hashlib.sha256(code + " ".join(flags).encode() + platform.machine().encode()
                         + platform.node().encode() + cpu_flags().encode()).hexdigest()[:16]
    suffix = "" if isa == "native" else f"-{isa}"
    target = cache_dir() / "kernels" / f"{source.stem}{suffix}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-march=native", *flags, "-ffast-math", "-fno-finite-math-only", "-fopenmp",
                   "-shared", "-fPIC", f"-I{header.parent}", str(source), "-o", str(built), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
                logger.warning("%s: building the native kernel failed (%s); the torch path runs", source.name, last)
                return None
            os.replace(built, target)
    logger.info("%s: native kernel (%s) loaded from %s", source.name, isa, target)
    return ctypes.CDLL(str(target))
