"""Build a kernel's C source into a shared library on first use and load it with ctypes.

Native kernels (``*.c`` beside an op's ``native.py``) are compiled with the system C compiler
(``$CC``, else ``cc``/``gcc``) as ``-O3 -march=native -fopenmp`` into ``$HEADWISE_CACHE/kernels/``,
keyed by the source hash and the machine. OpenMP resolves to the ``libgomp`` torch already loaded,
so kernels and torch share one thread pool. A missing compiler or a failed build is logged once and
returns ``None``; the op's ``auto`` backend then runs its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
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


@lru_cache(maxsize=None)
def load_native(source: Path) -> ctypes.CDLL | None:
    """The compiled library of ``source``, or ``None`` when it cannot be built here (logged)."""
    from ..models import cache_dir

    compiler = _compiler()
    if compiler is None:
        logger.warning("%s: no C compiler found; the native kernel is off and the torch path runs", source.name)
        return None
    header = Path(__file__).with_name("native.h")
    code = source.read_bytes() + header.read_bytes()
    key = hashlib.sha256(code + platform.machine().encode() + platform.node().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp", "-shared",
                   "-fPIC", f"-I{header.parent}", str(source), "-o", str(built), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
                logger.warning("%s: building the native kernel failed (%s); the torch path runs", source.name, last)
                return None
            os.replace(built, target)
    logger.info("%s: native kernel loaded from %s", source.name, target)
    return ctypes.CDLL(str(target))
