"""Triton paged decode: one program per (sequence, KV head), its GQA query heads as the tile rows.

Same signature and result as ``naive.paged_decode``. The program walks the head's block table in
tiles of ``BLOCK_N`` slots (slot ``s`` is block ``table[s // block_size]``, offset
``s % block_size``; ``block_size`` is a runtime value), loads the slot positions, masks keys the
query may not read (sink + window rule, empty slots, unused table entries) and keeps an online
softmax over the ``G = H / Hkv`` query heads, padded to 16 rows for ``tl.dot``. Ring order is fine:
the mask reads positions, not slot order. Tables of window heads only hold their kept blocks, so
there is nothing to skip; there is no split-K yet (a GPU with few sequences is under-filled).

Imported lazily (``paged_decode/__init__``); on CPU tensors it runs under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sink_window.triton import _check_device, fp32_dots


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, table_ptr, qpos_ptr, sink_ptr, span_ptr,
                         stride_qb, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                         stride_ob, stride_oh, stride_pp, stride_tb, stride_tr,
                         Hkv, Hb, G, D, block_size, num_slots, qk_scale,
                         IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hkv
    hk = pid % Hkv
    row = hk // Hb
    hb = hk % Hb
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + (hk * G + offs_g[:, None]) * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    q_pos = tl.load(qpos_ptr + b)
    sink = tl.load(sink_ptr + hk)
    span = tl.load(span_ptr + b * Hkv + hk)
    table = table_ptr + b * stride_tb + row * stride_tr
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n in range(0, num_slots, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        in_table = offs_n < num_slots
        block = tl.load(table + offs_n // block_size, mask=in_table, other=-1).to(tl.int64)
        used = in_table & (block >= 0)
        slot = offs_n % block_size
        k_pos = tl.load(pos_ptr + block * stride_pp + slot, mask=used, other=-1)
        # q_pos < 0 (idle row) sees nothing: k_pos >= 0 > q_pos
        seen = used & (k_pos >= 0) & (k_pos <= q_pos) & ((k_pos < sink) | (k_pos > q_pos - span))
        kv_mask = seen[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kp + slot[:, None] * stride_ks + hb * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(seen[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + block[:, None] * stride_vp + slot[:, None] * stride_vs + hb * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    tl.store(o_ptr + b * stride_ob + (hk * G + offs_g[:, None]) * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, pos_pool: torch.Tensor,
                 block_tables: torch.Tensor, q_pos: torch.Tensor, sink: torch.Tensor, span: torch.Tensor,
                 scale: float, block_n: int = 64) -> torch.Tensor:
    """``[B, H, D]`` decode output; shapes as ``naive.paged_decode``. ``block_n``: slots per tile."""
    _check_device(q)
    B, H, D = q.shape
    P, block_size, Hb, _ = k_pool.shape
    Ht, M = block_tables.shape[1], block_tables.shape[2]
    Hkv = Ht * Hb
    G = H // Hkv
    q, k_pool, v_pool = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_pool, v_pool))
    pos_pool = pos_pool.long().contiguous()
    block_tables = block_tables.contiguous()
    q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    sink = sink.to(device=q.device, dtype=torch.int64).contiguous()
    span = span.to(device=q.device, dtype=torch.int64).contiguous()
    out = torch.empty(B, H, D, device=q.device, dtype=q.dtype)
    _paged_decode_kernel[(B * Hkv,)](
        q, k_pool, v_pool, out, pos_pool, block_tables, q_pos, sink, span,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), out.stride(0), out.stride(1),
        pos_pool.stride(0), block_tables.stride(0), block_tables.stride(1),
        Hkv, Hb, G, D, block_size, M * block_size, float(scale),
        IEEE=fp32_dots(q.dtype), BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)))
    return out
