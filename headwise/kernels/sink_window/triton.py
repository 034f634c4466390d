"""Triton sink + window attention: FlashAttention-style tiles, online softmax, block skipping.

Same signature and result as ``naive.sink_window_attention``. One program computes one block of
``BLOCK_M`` queries of one query head (GQA: it reads KV head ``h // (H // Hkv)``) and visits only
two slot ranges of its KV head: the sink ``[0, sink)`` and the window band
``[q_min - span + 1, q_max]`` of its queries. Every other key tile is skipped without being loaded.

Positions: the kernel needs each KV head's slots in position order, so that the two ranges are
contiguous slot ranges. The wrapper keeps the slots as they are when they already are sorted
(prefill without cache, left or right padding, compacted cache followed by new keys) and otherwise
sorts them once per call (``torch.sort`` + gather, O(S) per head, e.g. a ring-ordered cache);
the slot ranges of every (sequence, KV head, query block) are found by ``torch.searchsorted`` on
the host side of the launch and passed to the kernel. Within the ranges every key is still checked
against the exact visibility rule, so the ranges only need to cover, not to be tight.

``import triton`` happens when this module is imported; ``sink_window/__init__`` imports it lazily
on first use, so the package works without Triton. On CPU tensors the kernel runs only under
``TRITON_INTERPRET=1`` (set before the first call), which the tests use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Key position used for empty slots once keys are sorted: right of every real key.
PAST_END = torch.iinfo(torch.int64).max


@triton.jit
def _accumulate(acc, m_i, l_i, q, q_pos, qk_scale, k_ptr, v_ptr, kpos_ptr, stride_ks, stride_vs,
                start, stop, sink, span, offs_d, d_mask, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of ``acc [M, D]`` with key slots ``[start, stop)`` of one KV head."""
    for n in range(start, stop, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        in_range = offs_n < stop
        k_pos = tl.load(kpos_ptr + offs_n, mask=in_range, other=-1)
        k = tl.load(k_ptr + offs_n[:, None] * stride_ks + offs_d[None, :],
                    mask=in_range[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        kp = k_pos[None, :]
        qp = q_pos[:, None]
        seen = in_range[None, :] & (kp >= 0) & (qp >= 0) & (kp <= qp) & ((kp < sink) | (kp > qp - span))
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=in_range[:, None] & d_mask[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sink_window_kernel(q_ptr, k_ptr, v_ptr, o_ptr, qpos_ptr, kpos_ptr, sink_ptr, span_ptr, ranges_ptr,
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
    sink_start = tl.load(r)
    sink_stop = tl.load(r + 1)
    win_start = tl.load(r + 2)
    win_stop = tl.load(r + 3)
    k_head = k_ptr + b * stride_kb + hk * stride_kh
    v_head = v_ptr + b * stride_vb + hk * stride_vh
    kpos_head = kpos_ptr + b * stride_pb
    if KPOS_PER_HEAD:
        kpos_head += hk * stride_ph
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _accumulate(acc, m_i, l_i, q, q_pos, qk_scale, k_head, v_head, kpos_head, stride_ks,
                                stride_vs, sink_start, sink_stop, sink, span, offs_d, d_mask, IEEE, BLOCK_N)
    acc, m_i, l_i = _accumulate(acc, m_i, l_i, q, q_pos, qk_scale, k_head, v_head, kpos_head, stride_ks,
                                stride_vs, win_start, win_stop, sink, span, offs_d, d_mask, IEEE, BLOCK_N)
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_oq + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def keys_in_position_order(k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor):
    """Slots sorted by position, per sequence and KV-position row.

    Args:
        k, v: ``[B, Hkv, S, D]``; k_pos: ``[B, Hk, S]`` int64, -1 for empty slots.

    Returns:
        ``(pos [B, Hk, S], k, v)``: ``pos`` rows non-decreasing, empty slots read as -1 when they
        all come first or as ``PAST_END`` otherwise; ``k, v`` are gathered only when slots moved.
    """
    if bool((k_pos[..., 1:] >= k_pos[..., :-1]).all()):
        return k_pos, k, v
    past_end = k_pos.masked_fill(k_pos < 0, PAST_END)
    if bool((past_end[..., 1:] >= past_end[..., :-1]).all()):
        return past_end, k, v
    past_end, order = torch.sort(past_end, dim=-1, stable=True)
    index = order.expand(k.shape[0], k.shape[1], -1)[..., None].expand(-1, -1, -1, k.shape[-1])
    return past_end, k.gather(2, index), v.gather(2, index)


def slot_ranges(pos: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
                block_m: int) -> torch.Tensor:
    """Slot ranges each query block must visit.

    Args:
        pos: ``[B, Hk, S]`` sorted positions (``keys_in_position_order``); q_pos: ``[B, Q]``;
        sink: ``[Hkv]``; span: ``[B, Hkv]``; block_m: queries per block.

    Returns:
        ``[B, Hkv, M, 4]`` int32 ``(sink_start, sink_stop, window_start, window_stop)`` with
        ``M = ceil(Q / block_m)``; blocks without a real query get empty ranges.
    """
    B, Q = q_pos.shape
    Hkv = span.shape[1]
    M = triton.cdiv(Q, block_m)
    padded = torch.nn.functional.pad(q_pos, (0, M * block_m - Q), value=-1).view(B, M, block_m)
    real = padded >= 0
    q_max = padded.max(-1).values                                                   # [B, M]
    q_min = padded.masked_fill(~real, PAST_END).min(-1).values
    q_min = torch.where(real.any(-1), q_min, q_max)
    q_max, q_min = q_max[:, None], q_min[:, None]                                   # [B, 1, M]
    sink_b = sink[None, :, None]
    bounds = torch.stack([
        torch.zeros_like(q_max).expand(B, Hkv, M),
        torch.minimum(sink_b, q_max + 1).expand(B, Hkv, M),
        torch.maximum(torch.maximum(sink_b, q_min - span[:, :, None] + 1), torch.zeros_like(q_min)),
        (q_max + 1).expand(B, Hkv, M),
    ], dim=-1)                                                                      # [B, Hkv, M, 4]
    pos_rows = pos.expand(B, Hkv, -1).contiguous() if pos.shape[1] == 1 else pos.contiguous()
    slots = torch.searchsorted(pos_rows, bounds.reshape(B, Hkv, M * 4)).view(B, Hkv, M, 4)
    slots = slots.masked_fill((q_max < 0)[..., None].expand_as(slots), 0)          # no real query
    return slots.to(torch.int32).contiguous()


def sink_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                          k_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor, scale: float,
                          block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Causal attention where every KV head reads its sink and its own local window.

    Args:
        q: ``[B, H, Q, D]`` fp32/fp16/bf16; k, v: ``[B, Hkv, S, D]`` in any slot order.
        q_pos: ``[B, Q]`` int64; k_pos: ``[B, Hk, S]`` int64 (``Hk`` 1 or ``Hkv``), -1 = empty;
        sink: ``[Hkv]`` int64; span: ``[B, Hkv]`` int64; scale: softmax scale (see
        ``naive.visible``). block_m, block_n: query and key tile sizes (powers of two, >= 16).

    Returns:
        ``[B, H, Q, D]`` in ``q.dtype``; fp32 inputs use IEEE fp32 dots, fp16/bf16 use native dots
        accumulating in fp32 (fp32 dots under the interpreter, whose bf16 dot is wrong).
    """
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
    out = torch.empty(B, H, Q, D, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(Q, block_m), B * H)
    _sink_window_kernel[grid](
        q, k, v, out, q_pos, pos, sink, span, ranges,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        pos.stride(0), pos.stride(1), ranges.stride(0), ranges.stride(1), ranges.stride(2),
        H, Hkv, Q, D, float(scale),
        KPOS_PER_HEAD=pos.shape[1] > 1, IEEE=fp32_dots(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fp32_dots(dtype: torch.dtype) -> bool:
    """Dots in IEEE fp32: for fp32 inputs, and always under the interpreter (its bf16 dot is wrong)."""
    return dtype == torch.float32 or interpreting()


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError("the triton backend got CPU tensors; set TRITON_INTERPRET=1 before the first call "
                           "(tests do) or use backend='cpu'.")
