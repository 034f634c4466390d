"""Triton hybrid window attention: ``sink_window``'s tiles and online softmax, plus a linear part in the
normaliser.

Same signature and result as ``naive.hybrid_window_attention``. One program computes one block of
``BLOCK_M`` queries of one query head and visits only the sink and window slot ranges of its KV
head (``headwise.kernels.sink_window.triton``: slots sorted by position, ranges found by
``searchsorted`` before the launch, every key checked against the exact rule). The online softmax
ends with ``acc = sum exp(a - m) v`` and ``l = sum exp(a - m)`` for the row's true maximum ``m``, so
the epilogue is ``(acc + lin_num) / (l + lin_den)``.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sink_window.triton import _accumulate, _check_device, fp32_dots, keys_in_position_order, slot_ranges


@triton.jit
def _hybrid_window_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qpos_ptr, kpos_ptr, sink_ptr, span_ptr, ranges_ptr,
                          num_ptr, den_ptr,
                          stride_qb, stride_qh, stride_qq, stride_kb, stride_kh, stride_ks,
                          stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_oq,
                          stride_pb, stride_ph, stride_rb, stride_rh, stride_rm,
                          H, Hkv, Q, D, qk_scale,
                          KPOS_PER_HEAD: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < Q
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qq + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    q_pos = tl.load(qpos_ptr + b * Q + offs_m, mask=m_mask, other=-1)
    sink = tl.load(sink_ptr + hk)
    span = tl.load(span_ptr + b * Hkv + hk)
    r = ranges_ptr + b * stride_rb + hk * stride_rh + pid_m * stride_rm
    k_head = k_ptr + b * stride_kb + hk * stride_kh
    v_head = v_ptr + b * stride_vb + hk * stride_vh
    kpos_head = kpos_ptr + b * stride_pb
    if KPOS_PER_HEAD:
        kpos_head += hk * stride_ph
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _accumulate(acc, m_i, l_i, q, q_pos, qk_scale, k_head, v_head, kpos_head, stride_ks,
                                stride_vs, tl.load(r), tl.load(r + 1), sink, span, offs_d, d_mask, IEEE, BLOCK_N)
    acc, m_i, l_i = _accumulate(acc, m_i, l_i, q, q_pos, qk_scale, k_head, v_head, kpos_head, stride_ks,
                                stride_vs, tl.load(r + 2), tl.load(r + 3), sink, span, offs_d, d_mask, IEEE, BLOCK_N)
    # linear part: [B, H, Q, D] and [B, H, Q] contiguous fp32
    row = (b * H + h) * Q + offs_m
    lin_num = tl.load(num_ptr + row[:, None] * D + offs_d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    lin_den = tl.load(den_ptr + row, mask=m_mask, other=0.0)
    den = l_i + lin_den
    out = tl.where((den[:, None] > 0) & (q_pos[:, None] >= 0),
                   (acc + lin_num) / tl.where(den > 0, den, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_oq + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def hybrid_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                            lin_num: torch.Tensor, lin_den: torch.Tensor, block_m: int = 64,
                            block_n: int = 64) -> torch.Tensor:
    """Shapes as ``naive.hybrid_window_attention``; block_m, block_n: query and key tile sizes
    (powers of two, >= 16). fp32 inputs use IEEE fp32 dots; fp16/bf16 native dots accumulating in fp32."""
    _check_device(q)
    B, H, Q, D = q.shape
    if k_pos.shape[1] > 1 and bool((k_pos == k_pos[:, :1]).all()):
        k_pos = k_pos[:, :1]
    pos, k, v = keys_in_position_order(k, v, k_pos.long())
    sink = sink.to(device=q.device, dtype=torch.int64).contiguous()
    span = span.to(device=q.device, dtype=torch.int64).contiguous()
    q_pos = q_pos.long().contiguous()
    ranges = slot_ranges(pos, q_pos, sink, span, block_m)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    pos = pos.contiguous()
    lin_num = lin_num.float().contiguous()
    lin_den = lin_den.float().contiguous()
    out = torch.empty(B, H, Q, D, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(Q, block_m), B * H)
    _hybrid_window_kernel[grid](
        q, k, v, out, q_pos, pos, sink, span, ranges, lin_num, lin_den,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pos.stride(0), pos.stride(1), ranges.stride(0), ranges.stride(1), ranges.stride(2),
        H, k.shape[1], Q, D, float(scale),
        KPOS_PER_HEAD=pos.shape[1] > 1, IEEE=fp32_dots(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out

