"""Engine settings in one dataclass, validated when made."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..kernels import check_backend

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | float | str) -> int:
    """``"2GiB"``, ``"512MB"``, ``1 << 30`` -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise InputError(f"kv_cache_memory {value!r} is not a size; write it like '2GiB', '512MiB' or a byte count.")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise InputError(f"kv_cache_memory must be positive, got {value!r}.")
    return size


@dataclass
class EngineConfig:
    """How the engine sizes its KV pool and batches.

    kv_cache_memory: bytes of the preallocated KV pool (keys, values and slot positions).
    block_size: token slots per block; every (sequence, layer, KV head) owns whole blocks.
    max_num_seqs: most sequences in flight at once.
    max_num_batched_tokens: tokens one step may run (decode tokens + prefill chunks). 8192 lets
        prompts up to 8k prefill in one chunk: a continuation chunk reads KV gathered from the pool
        through the kernel's general (masked) path, measured 2x slower for a 4k prompt in 2 chunks.
    dtype: weights and KV dtype (fp32 default; bf16 halves the bytes a decode step reads).
    backend: attention kernel backend ("auto", "cpu", "naive", "native", "triton").
    native_linear: in steps of at most 8 tokens (decode), run the model's linear layers through the
        native skinny-linear kernel (``kernels.skinny_linear``) instead of torch's GEMM, and on
        Llama-family models (``engine.lean``) run such steps as a lean forward over the HF modules'
        weights instead of the HF module stack. False: every step is the plain HF forward.
    """

    kv_cache_memory: int | str = "2GiB"
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 8192
    dtype: torch.dtype = torch.float32
    backend: str = "auto"
    native_linear: bool = True

    def __post_init__(self):
        self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive whole number, got {value!r}.")
        if isinstance(self.dtype, str):
            self.dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                          "bf16": torch.bfloat16, "float16": torch.float16}.get(self.dtype, self.dtype)
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InputError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")
        check_backend(self.backend)
        if not isinstance(self.native_linear, bool):
            raise InputError(f"native_linear must be True or False, got {self.native_linear!r}.")
