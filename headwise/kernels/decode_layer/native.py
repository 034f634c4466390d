"""Native decode layers (``decode_layer.c``): a decode step's layers in one C call, or each layer in two.

Why: written as torch calls a decode step of a small model spends as long on per-op dispatch
(norms, RoPE, residual adds, KV writes, about 60 small ops per layer) as on reading its weights.
``DecodeLayers`` holds the model's weight pointers once; ``run`` executes layers ``[first, last)``
of a decode-only step (norm, QKV, RoPE, KV write, paged attention, O projection, MLP) without
returning to Python; ``pre`` / ``post`` split a layer around attention run elsewhere (a prefill
chunk in the step, a kind whose decode is not paged softmax). Contract: ``naive.py``.
"""

from __future__ import annotations

import ctypes
import logging
from functools import lru_cache
from pathlib import Path

import torch

from ..native_build import default_isa, load_native, native_error
from ..paged_decode.native import MAX_BLOCK
from .naive import Dims, LayerWeights

logger = logging.getLogger("headwise.kernels")

SOURCE = Path(__file__).with_name("decode_layer.c")
#: Token rows one call takes (``T`` in the C source).
MAX_ROWS = 16
_FIELDS = ("q", "k", "v", "o", "gate", "up", "down", "q_bias", "k_bias", "v_bias", "input_norm", "post_norm",
           "q_norm", "k_norm")                                       # the C enum's order (NW pointers per layer)


class _Dims(ctypes.Structure):
    _fields_ = [("E", ctypes.c_int64), ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64),
                ("F", ctypes.c_int64), ("eps", ctypes.c_float), ("qk_eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("w_bf16", ctypes.c_int)]


class _Pool(ctypes.Structure):
    _fields_ = [("k_pool", ctypes.c_void_p), ("v_pool", ctypes.c_void_p), ("pos_pool", ctypes.c_void_p),
                ("bs", ctypes.c_int64), ("kv_bf16", ctypes.c_int), ("write_offsets", ctypes.c_void_p),
                ("write_dst", ctypes.c_void_p), ("write_src", ctypes.c_void_p), ("write_pos", ctypes.c_void_p),
                ("tables", ctypes.c_void_p), ("M", ctypes.c_int64), ("q_pos", ctypes.c_void_p),
                ("sink", ctypes.c_void_p), ("span", ctypes.c_void_p)]


@lru_cache(maxsize=None)
def library(isa: str | None = None):
    """The compiled kernel for ``isa`` (``native_build.ISA_FLAGS``) with its signatures, or ``None``."""
    lib = load_native(SOURCE, default_isa() if isa is None else isa)
    if lib is not None:
        p = ctypes.c_void_p
        lib.decode_pre.restype = lib.decode_post.restype = lib.decode_layers.restype = ctypes.c_int
        lib.decode_pre.argtypes = [p] * 9 + [ctypes.c_int64]
        lib.decode_post.argtypes = [p] * 7 + [ctypes.c_int64]
        lib.decode_layers.argtypes = [p] * 13 + [ctypes.c_int64] * 3
        lib.decode_profile.restype = None
        lib.decode_profile.argtypes = [ctypes.c_int, p]
    return lib


def available(isa: str | None = None) -> bool:
    return library(isa) is not None


#: What ``profile`` reports, in the C counters' order.
PROFILE_PARTS = ("linears", "attention", "KV writes", "norms, RoPE, residual adds, SiLU")


def profile(on: bool, read: bool = True, isa: str | None = None) -> dict[str, float]:
    """Turn the kernel's wall-time counters on or off. With ``read``, returns the seconds counted per part
    of ``PROFILE_PARTS`` since the last read and resets them. For benchmarks: each counter is a clock read."""
    lib = library(isa)
    if lib is None:
        return {}
    out = (ctypes.c_double * len(PROFILE_PARTS))()
    lib.decode_profile(int(on), out if read else None)
    return dict(zip(PROFILE_PARTS, out)) if read else {}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class DecodeLayers:
    """A decoder's layers for the native kernel: weight pointers gathered once, scratch reused.

    The tensors in ``layers`` must stay alive and unmoved while this object is used (it keeps them).
    """

    def __init__(self, dims: Dims, layers: list[LayerWeights], isa: str | None = None):
        self.isa = default_isa() if isa is None else isa
        self.lib = library(self.isa)
        if self.lib is None:
            raise RuntimeError("the native decode_layer kernel could not be built here; run the torch path.")
        dtypes = {getattr(w, f).dtype for w in layers for f in _FIELDS[:7]}
        if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.bfloat16}:
            raise ValueError(f"native decode layers need every matrix in one dtype, fp32 or bf16; got {dtypes}.")
        for w in layers:
            for f in _FIELDS:
                t = getattr(w, f)
                if t is not None and not t.is_contiguous():
                    raise ValueError(f"native decode layers need contiguous tensors; {f} is not.")
                if t is not None and f in _FIELDS[7:] and t.dtype != torch.float32:
                    raise ValueError(f"native decode layers take fp32 biases and norm weights; {f} is {t.dtype}.")
        if dims.D % 2 or dims.D > 256 or dims.H % dims.Hkv or dims.H // dims.Hkv > 16:
            raise ValueError(f"native decode layers take an even head dim <= 256 and <= 16 query heads per KV head, "
                             f"got D={dims.D}, H={dims.H}, Hkv={dims.Hkv}.")
        self.dims, self.layers = dims, layers
        self.c_dims = _Dims(dims.E, dims.H, dims.Hkv, dims.D, dims.F, dims.eps, dims.qk_eps, dims.scale,
                            int(dtypes == {torch.bfloat16}))
        self.pointers = torch.tensor([_ptr(getattr(w, f)) for w in layers for f in _FIELDS], dtype=torch.int64)
        self._pointer_list = self.pointers.tolist()
        self._scratch: dict[int, tuple[torch.Tensor, ...]] = {}

    @property
    def matrix_pointers(self) -> list[int]:
        """Addresses of the matrices this object reads, layer by layer in ``q, k, v, o, gate, up, down`` order
        (a caller compares them with the model's to notice weights moved or replaced since)."""
        return [p for i, p in enumerate(self._pointer_list) if i % len(_FIELDS) < 7]

    def scratch(self, T: int) -> tuple[torch.Tensor, ...]:
        """``h [T, E], q [T, H*D], k, v [T, Hkv*D], o [T, H*D], g, u [T, F]`` fp32 buffers for ``T`` rows."""
        if T not in self._scratch:
            d = self.dims
            self._scratch[T] = tuple(torch.empty(T, n) for n in (d.E, d.H * d.D, d.Hkv * d.D, d.Hkv * d.D,
                                                                   d.H * d.D, d.F, d.F))
        return self._scratch[T]

    def _layer_ptr(self, layer: int) -> int:
        return self.pointers.data_ptr() + layer * len(_FIELDS) * 8

    def _check_rows(self, x: torch.Tensor) -> int:
        T = x.shape[0]
        if not 1 <= T <= MAX_ROWS or x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] != self.dims.E:
            raise ValueError(f"native decode layers take 1 to {MAX_ROWS} contiguous fp32 rows of {self.dims.E}, "
                             f"got {tuple(x.shape)} {x.dtype}.")
        return T

    def pre(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``x [T, E]``, ``cos, sin [T, D]`` fp32 -> ``q [T, H, D]``, ``k, v [T, Hkv, D]`` (new tensors)."""
        T, d = self._check_rows(x), self.dims
        h = self.scratch(T)[0]
        q, k, v = torch.empty(T, d.H, d.D), torch.empty(T, d.Hkv, d.D), torch.empty(T, d.Hkv, d.D)
        rc = self.lib.decode_pre(ctypes.byref(self.c_dims), self._layer_ptr(layer), x.data_ptr(), cos.data_ptr(),
                                 sin.data_ptr(), h.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), T)
        if rc != 0:
            raise native_error(rc, f"native decode_pre refused {T} rows.")
        return q, k, v

    def post(self, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """``x [T, E]`` updated in place with the layer's output; ``o [T, H*D]`` fp32 attention output."""
        T = self._check_rows(x)
        h, _, _, _, _, g, u = self.scratch(T)
        o = o.reshape(T, -1).float().contiguous()
        rc = self.lib.decode_post(ctypes.byref(self.c_dims), self._layer_ptr(layer), x.data_ptr(), o.data_ptr(),
                                  h.data_ptr(), g.data_ptr(), u.data_ptr(), T)
        if rc != 0:
            raise native_error(rc, f"native decode_post refused {T} rows.")
        return x

    def run(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
            pos_pool: torch.Tensor, write_offsets: torch.Tensor, write_dst: torch.Tensor, write_src: torch.Tensor,
            write_pos: torch.Tensor, tables: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor,
            span: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Layers ``[first, last)`` of a decode-only step, ``x`` updated in place; arguments as
        ``naive.decode_layers`` (the pool ``[P, bs, 1, D]`` contiguous, plan tensors contiguous)."""
        last = len(self.layers) if last is None else last
        T, d = self._check_rows(x), self.dims
        P, bs, Hb, D = k_pool.shape
        if (Hb != 1 or D != d.D or bs > MAX_BLOCK or k_pool.dtype not in (torch.float32, torch.bfloat16)
                or v_pool.dtype != k_pool.dtype or not k_pool.is_contiguous() or not v_pool.is_contiguous()):
            raise ValueError(f"native decode layers take contiguous fp32/bf16 [P, bs <= {MAX_BLOCK}, 1, {d.D}] pools, "
                             f"got {tuple(k_pool.shape)} {k_pool.dtype}.")
        L = len(self.layers)
        if tables.shape[:3] != (L, T, d.Hkv) or span.shape != (L, T, d.Hkv) or sink.shape != (L, d.Hkv):
            raise ValueError(f"native decode layers need tables [L, T, Hkv, M], span [L, T, Hkv] and sink [L, Hkv] "
                             f"for L={L}, T={T}, Hkv={d.Hkv}; got {tuple(tables.shape)}, {tuple(span.shape)}, "
                             f"{tuple(sink.shape)}.")
        keep = (write_offsets, write_dst, write_src, write_pos, tables, q_pos, sink, span)
        write_offsets, write_dst, write_src, write_pos, q_pos, sink, span = (
            t.to(torch.int64).contiguous() for t in (write_offsets, write_dst, write_src, write_pos, q_pos, sink, span))
        tables = tables.to(torch.int32).contiguous()
        pool = _Pool(k_pool.data_ptr(), v_pool.data_ptr(), pos_pool.data_ptr(), bs, int(k_pool.dtype == torch.bfloat16),
                     write_offsets.data_ptr(), write_dst.data_ptr(), write_src.data_ptr(), write_pos.data_ptr(),
                     tables.data_ptr(), tables.shape[3], q_pos.data_ptr(), sink.data_ptr(), span.data_ptr())
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
        h, q, k, v, o, g, u = self.scratch(T)
        rc = self.lib.decode_layers(ctypes.byref(self.c_dims), self.pointers.data_ptr(), ctypes.byref(pool),
                                    x.data_ptr(), cos.data_ptr(), sin.data_ptr(), h.data_ptr(), q.data_ptr(),
                                    k.data_ptr(), v.data_ptr(), o.data_ptr(), g.data_ptr(), u.data_ptr(), T, first, last)
        del keep
        if rc != 0:
            raise native_error(rc, f"native decode_layers refused T={T}, D={d.D}, block {bs}.")
        return x
