"""Reference (torch, fp32 math) of the native decode layer: what ``decode_layer.c`` computes.

A Llama-family decoder layer (Llama, Mistral, Qwen2 with Q/K/V biases, Qwen3 with q/k norms) for a
few token rows, split where a step's attention goes:

- ``pre_attention``: RMSNorm, Q/K/V projections (+ biases), per-head q/k RMSNorm, RoPE;
- ``post_attention``: O projection + residual, RMSNorm, SiLU-gated MLP + residual;
- ``decode_layers``: for a decode-only step, per layer ``pre_attention``, the step's keys/values
  written into the paged pool, ``paged_decode`` over it, ``post_attention``.

Activations are fp32 whatever the weights' dtype (fp32 or bf16, read converted); keys/values are
stored in the pool's dtype. The HF forward in fp32 computes the same numbers up to summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..paged_decode.naive import paged_decode
from ..skinny_linear.naive import skinny_linear as _linear


@dataclass(frozen=True)
class Dims:
    """Shapes of a decoder: hidden ``E``, query heads ``H``, KV heads ``Hkv``, head dim ``D``, MLP width ``F``."""

    E: int
    H: int
    Hkv: int
    D: int
    F: int
    eps: float
    qk_eps: float
    scale: float


@dataclass
class LayerWeights:
    """One layer's tensors. Matrices ``[out, in]`` fp32 or bf16 (all the same dtype, contiguous);
    biases, norm weights fp32 ``[out]`` / ``[E]`` / ``[D]``; ``None`` where the model has none."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm in fp32 over the last dimension."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, heads, D]`` rotated with ``cos, sin [T, D]`` (HF's ``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


def pre_attention(dims: Dims, w: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``x [T, E]`` fp32, ``cos, sin [T, D]`` -> ``q [T, H, D]``, ``k, v [T, Hkv, D]`` fp32 (RoPE applied)."""
    T = x.shape[0]
    h = rms_norm(x, w.input_norm, dims.eps)
    q = _linear(h, w.q, w.q_bias).view(T, dims.H, dims.D)
    k = _linear(h, w.k, w.k_bias).view(T, dims.Hkv, dims.D)
    v = _linear(h, w.v, w.v_bias).view(T, dims.Hkv, dims.D)
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, dims.qk_eps)
    if w.k_norm is not None:
        k = rms_norm(k, w.k_norm, dims.qk_eps)
    return rope(q, cos, sin), rope(k, cos, sin), v


def post_attention(dims: Dims, w: LayerWeights, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``x [T, E]``, attention output ``o [T, H * D]`` -> the layer's output ``[T, E]`` (fp32)."""
    x = x + _linear(o, w.o)
    h = rms_norm(x, w.post_norm, dims.eps)
    return x + _linear(F.silu(_linear(h, w.gate)) * _linear(h, w.up), w.down)


def decode_layers(dims: Dims, layers: list[LayerWeights], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor,
                  write_offsets: torch.Tensor, write_dst: torch.Tensor, write_src: torch.Tensor,
                  write_pos: torch.Tensor, tables: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor,
                  span: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
    """Layers ``[first, last)`` of a decode-only step of ``T`` tokens (token ``t`` = sequence ``t``).

    Args:
        x: ``[T, E]`` fp32 residual stream entering layer ``first``.
        cos, sin: ``[T, D]`` fp32 RoPE tables at the tokens' positions.
        k_pool, v_pool: ``[P, bs, 1, D]`` fp32 or bf16, written in place; pos_pool ``[P, bs]`` int64.
        write_offsets: ``[L + 1]`` int64; layer ``l`` writes rows ``write_offsets[l]:write_offsets[l+1]`` of
            ``write_dst`` (flat pool slot), ``write_src`` (``t * Hkv + h``) and ``write_pos`` (position).
        tables: ``[L, T, Hkv, M]`` int32 block tables; q_pos ``[T]``; sink ``[L, Hkv]``; span ``[L, T, Hkv]``.

    Returns:
        ``[T, E]`` fp32, the residual stream after layer ``last - 1``.
    """
    last = len(layers) if last is None else last
    T, D = x.shape[0], dims.D
    for layer in range(first, last):
        w = layers[layer]
        q, k, v = pre_attention(dims, w, x, cos, sin)
        rows = slice(int(write_offsets[layer]), int(write_offsets[layer + 1]))
        dst, src = write_dst[rows], write_src[rows]
        k_pool.view(-1, D).index_copy_(0, dst, k.reshape(-1, D).index_select(0, src).to(k_pool.dtype))
        v_pool.view(-1, D).index_copy_(0, dst, v.reshape(-1, D).index_select(0, src).to(v_pool.dtype))
        pos_pool.view(-1).index_copy_(0, dst, write_pos[rows])
        o = paged_decode(q, k_pool, v_pool, pos_pool, tables[layer], q_pos, sink[layer], span[layer], dims.scale)
        x = post_attention(dims, w, x, o.reshape(T, -1).float())
    return x
