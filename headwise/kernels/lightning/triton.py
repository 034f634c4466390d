"""Triton lightning attention: one program per (sequence, query head) walks the blocks in order.

Each program keeps its KV head's ``F x E`` state in registers (fp32) and, per block of ``BT``
tokens, adds the intra-block part (a masked ``BT x BT`` decayed score matrix times ``v``) and the
inter-block part (``exp(G_t) q_t S``), then folds the block into the state — the intra/inter
split of TransNormerLLM's lightning attention (vLLM's ``lightning_attn.py`` and fla's simple-GLA
kernels split the same way, across more programs). Query heads of one KV head recompute the same
state (``G`` times the state work, which is small next to the reads); the first writes it out.
Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Same signature and result
as ``naive.lightning_attention``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Tokens per block (``tl.dot`` needs at least 16).
BLOCK_T = 16


@triton.jit
def _lightning_kernel(Q, K, V, LOG_DECAY, S0, OUT, SN, T, H, Hkv, F, E,
                      HAS_INIT: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, BE: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    G = H // Hkv
    hk = h // G
    f = tl.arange(0, BF)
    e = tl.arange(0, BE)
    rows = tl.arange(0, BT)
    f_ok = f < F
    e_ok = e < E
    q_base = Q + (b * H + h) * T * F
    k_base = K + (b * Hkv + hk) * T * F
    v_base = V + (b * Hkv + hk) * T * E
    g_base = LOG_DECAY + (b * Hkv + hk) * T
    o_base = OUT + (b * H + h) * T * E
    s_off = (b * Hkv + hk) * F * E + f[:, None] * E + e[None, :]
    s_ok = f_ok[:, None] & e_ok[None, :]
    if HAS_INIT:
        state = tl.load(S0 + s_off, mask=s_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BF, BE], dtype=tl.float32)
    causal = rows[:, None] >= rows[None, :]
    for start in range(0, T, BT):
        t = start + rows
        t_ok = t < T
        q = tl.load(q_base + t[:, None] * F + f[None, :], mask=t_ok[:, None] & f_ok[None, :], other=0.0)
        k = tl.load(k_base + t[:, None] * F + f[None, :], mask=t_ok[:, None] & f_ok[None, :], other=0.0)
        v = tl.load(v_base + t[:, None] * E + e[None, :], mask=t_ok[:, None] & e_ok[None, :], other=0.0)
        g = tl.load(g_base + t, mask=t_ok, other=0.0)
        cum = tl.cumsum(g, axis=0)                                       # [BT]
        decay = tl.where(causal, tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0)), 0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * decay
        out = tl.dot(scores, v, input_precision="ieee")
        out += tl.dot(q * tl.exp(cum)[:, None], state, input_precision="ieee")
        tl.store(o_base + t[:, None] * E + e[None, :], out, mask=t_ok[:, None] & e_ok[None, :])
        last = tl.sum(g, axis=0)                                         # padding rows add 0
        k_scaled = k * tl.exp(last - cum)[:, None]
        state = state * tl.exp(last) + tl.dot(tl.trans(k_scaled), v, input_precision="ieee")
    if h % G == 0:
        tl.store(SN + s_off, state, mask=s_ok)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                        initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes as ``naive.lightning_attention``; inputs are read as contiguous fp32."""
    B, H, T, F = q.shape
    Hkv, E = k.shape[1], v.shape[-1]
    qf, kf, vf = (x.float().contiguous() for x in (q, k, v))
    gf = log_decay.float().contiguous()
    out = torch.empty(B, H, T, E, dtype=torch.float32, device=q.device)
    final = torch.empty(B, Hkv, F, E, dtype=torch.float32, device=q.device)
    init = final if initial_state is None else initial_state.float().contiguous()
    _lightning_kernel[(B * H,)](qf, kf, vf, gf, init, out, final, T, H, Hkv, F, E,
                                HAS_INIT=initial_state is not None, BT=BLOCK_T,
                                BF=max(16, triton.next_power_of_2(F)), BE=max(16, triton.next_power_of_2(E)))
    return out, final
