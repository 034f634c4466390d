"""Triton softplus attention with re-weighting: three passes over the key tiles a query block can read.

Same signature and result as ``naive.softplus_attention``. One program computes ``BLOCK_M`` queries
of one query head (GQA: KV head ``h // (H // Hkv)``) and visits, like ``sink_window``'s kernel, only
two slot ranges of its KV head, the sink and the window band (keys put in position order and the
ranges found by ``sink_window.triton``'s helpers). Each range is walked three times:

1. count each row's readable keys ``n`` (positions only, no dot products): the length scale
   ``m(n)`` and the re-weighting both need it before any score;
2. online max and sum of ``exp(l)`` over the logits ``l = log phi(m s)``: the row's log normaliser;
3. the weights (``A = exp(l - lse)``, or ``(ReLU(n A - 1) / (n A_max - 1))^p`` with re-weighting)
   and their sum, accumulated with the values.

Pass 3 recomputes the dot products of pass 2 (no ``N x N`` buffer); a head without re-weighting
could use one online pass, which this kernel does not special-case.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sink_window.triton import _check_device, fp32_dots, keys_in_position_order, slot_ranges
from .naive import SOFTPLUS_LINEAR_BELOW, HeadParams


@triton.jit
def _count(n_i, q_pos, kpos_ptr, start, stop, sink, span, BLOCK_N: tl.constexpr):
    """Add to ``n_i [M]`` the readable keys among slots ``[start, stop)``."""
    for n in range(start, stop, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        in_range = offs_n < stop
        kp = tl.load(kpos_ptr + offs_n, mask=in_range, other=-1)[None, :]
        qp = q_pos[:, None]
        seen = in_range[None, :] & (kp >= 0) & (qp >= 0) & (kp <= qp) & ((kp < sink) | (kp > qp - span))
        n_i += tl.sum(seen.to(tl.float32), 1)
    return n_i


@triton.jit
def _logits(q, q_pos, row_mult, k_ptr, kpos_ptr, stride_ks, offs_n, in_range, sink, span, softplus,
            offs_d, d_mask, IEEE: tl.constexpr, LINEAR_BELOW: tl.constexpr):
    """``[M, BLOCK_N]`` logits ``log phi(m s)`` of one key tile, ``-inf`` where a key is not readable."""
    kp = tl.load(kpos_ptr + offs_n, mask=in_range, other=-1)
    k = tl.load(k_ptr + offs_n[:, None] * stride_ks + offs_d[None, :], mask=in_range[:, None] & d_mask[None, :],
                other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    x = s * row_mult[:, None]
    if softplus != 0:
        u = tl.exp(tl.minimum(x, 20.0))
        y = 1.0 + u
        log1p = tl.where(y == 1.0, u, tl.log(y) * u / tl.where(y == 1.0, 1.0, y - 1.0))   # accurate log(1 + u)
        sp = tl.where(x > 20.0, x, log1p)
        x = tl.where(x < LINEAR_BELOW, x, tl.log(tl.maximum(sp, 1e-38)))
    kq = kp[None, :]
    qp = q_pos[:, None]
    seen = in_range[None, :] & (kq >= 0) & (qp >= 0) & (kq <= qp) & ((kq < sink) | (kq > qp - span))
    return tl.where(seen, x, float("-inf"))


@triton.jit
def _normaliser(m_i, l_i, q, q_pos, row_mult, k_ptr, kpos_ptr, stride_ks, start, stop, sink, span, softplus,
                offs_d, d_mask, IEEE: tl.constexpr, LINEAR_BELOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online max ``m_i`` and sum ``l_i`` of ``exp(l - m_i)`` over slots ``[start, stop)``."""
    for n in range(start, stop, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        in_range = offs_n < stop
        lg = _logits(q, q_pos, row_mult, k_ptr, kpos_ptr, stride_ks, offs_n, in_range, sink, span, softplus,
                     offs_d, d_mask, IEEE, LINEAR_BELOW)
        m_new = tl.maximum(m_i, tl.max(lg, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), 1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _weighted(acc, w_i, q, q_pos, row_mult, lse, n_i, top, k_ptr, v_ptr, kpos_ptr, stride_ks, stride_vs, start,
              stop, sink, span, softplus, power, offs_d, d_mask, IEEE: tl.constexpr, LINEAR_BELOW: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Add the weights of slots ``[start, stop)`` to ``w_i [M]`` and weights times values to ``acc [M, D]``.

    ``top [M]`` is ``n A_max - 1``; rows with ``top > 0`` and ``power > 0`` are re-weighted."""
    for n in range(start, stop, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        in_range = offs_n < stop
        lg = _logits(q, q_pos, row_mult, k_ptr, kpos_ptr, stride_ks, offs_n, in_range, sink, span, softplus,
                     offs_d, d_mask, IEEE, LINEAR_BELOW)
        probs = tl.exp(lg - lse[:, None])                                      # 0 where not readable
        if power > 0:
            excess = n_i[:, None] * probs - 1.0
            ratio = excess / tl.where(top > 0, top, 1.0)[:, None]
            sharp = tl.where(ratio > 0, tl.exp(power * tl.log(tl.maximum(ratio, 1e-38))), 0.0)
            probs = tl.where((top > 0)[:, None], sharp, probs)
        w_i += tl.sum(probs, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vs + offs_d[None, :], mask=in_range[:, None] & d_mask[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(probs, v.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(probs.to(v.dtype), v)
    return acc, w_i


@triton.jit
def _softplus_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qpos_ptr, kpos_ptr, sink_ptr, span_ptr, ranges_ptr,
                     soft_ptr, temp_ptr, logref_ptr, floor_ptr, power_ptr,
                     stride_qb, stride_qh, stride_qq, stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_oq,
                     stride_pb, stride_ph, stride_rb, stride_rh, stride_rm,
                     H, Hkv, Q, D, scale,
                     KPOS_PER_HEAD: tl.constexpr, IEEE: tl.constexpr, LINEAR_BELOW: tl.constexpr,
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
    softplus = tl.load(soft_ptr + hk)
    temperature = tl.load(temp_ptr + hk)
    log_ref = tl.load(logref_ptr + hk)
    log_floor = tl.load(floor_ptr + hk)
    power = tl.load(power_ptr + hk)
    r = ranges_ptr + b * stride_rb + hk * stride_rh + pid_m * stride_rm
    sink_start = tl.load(r)
    sink_stop = tl.load(r + 1)
    win_start = tl.load(r + 2)
    win_stop = tl.load(r + 3)
    k_head = k_ptr + b * stride_kb + hk * stride_kh
    v_head = v_ptr + b * stride_vb + hk * stride_vh
    kpos_head = kpos_ptr + b * stride_pb
    if KPOS_PER_HEAD:
        kpos_head += hk * stride_ph
    # 1. readable keys per row, and the row's length scale m(n)
    n_i = tl.zeros([BLOCK_M], tl.float32)
    n_i = _count(n_i, q_pos, kpos_head, sink_start, sink_stop, sink, span, BLOCK_N)
    n_i = _count(n_i, q_pos, kpos_head, win_start, win_stop, sink, span, BLOCK_N)
    ratio = tl.log(tl.maximum(n_i, 1.0)) / tl.where(log_ref > 0, log_ref, 1.0)
    factor = tl.where(log_ref > 0, tl.maximum(ratio, log_floor), 1.0)
    row_mult = temperature * factor * scale
    # 2. log normaliser of the row
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i, l_i = _normaliser(m_i, l_i, q, q_pos, row_mult, k_head, kpos_head, stride_ks, sink_start, sink_stop, sink,
                           span, softplus, offs_d, d_mask, IEEE, LINEAR_BELOW, BLOCK_N)
    m_i, l_i = _normaliser(m_i, l_i, q, q_pos, row_mult, k_head, kpos_head, stride_ks, win_start, win_stop, sink,
                           span, softplus, offs_d, d_mask, IEEE, LINEAR_BELOW, BLOCK_N)
    lse = tl.where(l_i > 0, tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)
    top = n_i * tl.exp(tl.where(l_i > 0, m_i - lse, float("-inf"))) - 1.0     # n A_max - 1
    # 3. weights and values
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    w_i = tl.zeros([BLOCK_M], tl.float32)
    acc, w_i = _weighted(acc, w_i, q, q_pos, row_mult, lse, n_i, top, k_head, v_head, kpos_head, stride_ks,
                         stride_vs, sink_start, sink_stop, sink, span, softplus, power, offs_d, d_mask, IEEE,
                         LINEAR_BELOW, BLOCK_N)
    acc, w_i = _weighted(acc, w_i, q, q_pos, row_mult, lse, n_i, top, k_head, v_head, kpos_head, stride_ks,
                         stride_vs, win_start, win_stop, sink, span, softplus, power, offs_d, d_mask, IEEE,
                         LINEAR_BELOW, BLOCK_N)
    out = tl.where(w_i[:, None] > 0, acc / tl.where(w_i > 0, w_i, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_oq + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       sink: torch.Tensor, span: torch.Tensor, scale: float, params: HeadParams,
                       block_m: int = 32, block_n: int = 32) -> torch.Tensor:
    """``[B, H, Q, D]`` in ``q.dtype``; arguments as ``naive.softplus_attention`` (``block_m``, ``block_n``:
    query and key tile sizes, powers of two >= 16). fp32 inputs use IEEE fp32 dots."""
    _check_device(q)
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    if k_pos.shape[1] > 1 and bool((k_pos == k_pos[:, :1]).all()):
        k_pos = k_pos[:, :1]
    pos, k, v = keys_in_position_order(k, v, k_pos.long())
    sink = sink.to(device=q.device, dtype=torch.int64).contiguous()
    span = span.to(device=q.device, dtype=torch.int64).contiguous()
    q_pos = q_pos.long().contiguous()
    ranges = slot_ranges(pos, q_pos, sink, span, block_m)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    pos = pos.contiguous()
    p = params.to(q.device)
    soft = p.softplus.to(torch.int32).contiguous()
    temp, log_ref, floor, power = (t.float().contiguous() for t in (p.temperature, p.log_ref, p.log_floor, p.power))
    out = torch.empty(B, H, Q, D, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(Q, block_m), B * H)
    _softplus_kernel[grid](
        q, k, v, out, q_pos, pos, sink, span, ranges, soft, temp, log_ref, floor, power,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pos.stride(0), pos.stride(1), ranges.stride(0), ranges.stride(1), ranges.stride(2),
        H, Hkv, Q, D, float(scale),
        KPOS_PER_HEAD=pos.shape[1] > 1, IEEE=fp32_dots(q.dtype), LINEAR_BELOW=SOFTPLUS_LINEAR_BELOW,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out
