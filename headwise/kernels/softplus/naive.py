"""Reference softplus attention with re-weighting (LSSA / LSSAR): readable pure torch, fp32, explicit positions.

The contract every backend of the ``softplus`` op implements (docs/design.md, "Kernels"). Softmax is split into a
non-linearity and an l1 normalisation (Gao & Spratling, "Softplus Attention with Re-weighting
Boosts Length Extrapolation"); for one query row that reads the ``n`` keys ``j`` it may see::

    s_j  = scale * q . k_j                         scaled dot product, as softmax attention
    x_j  = m(n) * s_j                              length-dependent scale (the head's scale rule)
    e_j  = phi(x_j)                                phi = softplus (LSSA) or exp (softmax)
    A_j  = e_j / sum_i e_i                         l1 normalisation
    R_j  = ReLU(n * A_j - 1) ** p                  re-weighting (LSSAR): keeps the weights above
    W_j  = R_j / sum_i R_i                         the uniform 1/n, sharpened, renormalised
    out  = sum_j W_j v_j                           (p = 0: out = sum_j A_j v_j, no re-weighting)

``n`` is the row's number of readable keys (causal, within the head's sink + window): with every
key readable it is ``position + 1``, the paper's row-dependent length. A row with no weight above
``1/n`` (all ``A_j`` equal, e.g. ``n = 1``) has ``sum R = 0`` and keeps ``A``.

The length scale (``m``), per KV head: ``m(n) = temperature`` when ``log_ref == 0``, else
``m(n) = temperature * max(log_floor, log(n) / log_ref)``; ``log_ref = log(L)`` makes the factor 1 at
``n = L`` (entropy invariance relative to the length ``L``), ``log_floor = 1`` leaves rows up to
``L`` unchanged (a softmax-trained model inside its context), ``log_floor = 0`` scales every row.

Computed as a softmax over the logits ``l_j = log phi(x_j)`` (``l = x`` for exp; for softplus
``l = log(softplus(x))``, and ``l = x`` below ``x < -20`` where ``log(softplus(x)) = x`` to 1e-9),
which is the same ``A`` without overflow; the re-weighting divides by the row's largest
``n * A_j - 1`` before the power, so ``p`` up to 64 cannot overflow fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..sink_window.naive import visible

#: Below this ``x``, ``log(softplus(x))`` is taken as ``x`` (relative error < 1e-9).
SOFTPLUS_LINEAR_BELOW = -20.0


class HeadParams(NamedTuple):
    """Per-KV-head parameters of the op, each a ``[Hkv]`` tensor.

    softplus: bool, ``phi`` is softplus (True) or exp (False).
    temperature: float32, the constant factor of ``m``.
    log_ref: float32, ``log(L)`` of the length the ``log n`` factor is relative to; 0: no log factor.
    log_floor: float32, lower bound of ``log(n) / log_ref`` (1: rows up to ``L`` unchanged; 0: none).
    power: float32, re-weighting power ``p`` (0: no re-weighting).
    """

    softplus: torch.Tensor
    temperature: torch.Tensor
    log_ref: torch.Tensor
    log_floor: torch.Tensor
    power: torch.Tensor

    def to(self, device: torch.device) -> "HeadParams":
        return HeadParams(*(t.to(device) for t in self))

    def select(self, heads: list[int]) -> "HeadParams":
        index = torch.tensor(heads, dtype=torch.long, device=self.power.device)
        return HeadParams(*(t.index_select(0, index) for t in self))

    def is_softmax(self) -> torch.Tensor:
        """``[Hkv]`` bool: heads whose op is plain softmax attention (exp, ``m = 1``, no re-weighting)."""
        return (~self.softplus) & (self.temperature == 1.0) & (self.log_ref == 0.0) & (self.power == 0.0)


def row_scale(n: torch.Tensor, params: HeadParams) -> torch.Tensor:
    """``m(n)`` for row counts ``n [B, Hkv, Q]`` (any int dtype) -> ``[B, Hkv, Q]`` float32."""
    shape = (1, -1, 1)
    log_ref = params.log_ref.view(shape).float()
    ratio = torch.log(n.float().clamp(min=1.0)) / torch.where(log_ref > 0, log_ref, 1.0)
    factor = torch.where(log_ref > 0, torch.maximum(ratio, params.log_floor.view(shape).float()), 1.0)
    return params.temperature.view(shape).float() * factor


def logits(x: torch.Tensor, softplus: torch.Tensor) -> torch.Tensor:
    """``log phi(x)``: ``x`` where ``softplus`` is False (exp), ``log(softplus(x))`` where True.

    ``softplus`` broadcasts against ``x`` (e.g. ``[1, Hkv, 1, 1]``).
    """
    soft = torch.log(torch.nn.functional.softplus(x))
    soft = torch.where(x < SOFTPLUS_LINEAR_BELOW, x, soft)
    return torch.where(softplus, soft, x)


def reweighted(probs: torch.Tensor, n: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """Re-weighting of l1-normalised rows: ``ReLU(n A - 1)^p`` renormalised; ``p = 0`` or no weight
    above ``1/n`` keeps ``A``.

    Args:
        probs: ``[..., S]`` rows summing to 1 (0 outside the readable keys).
        n: ``[...]`` readable keys per row; power: broadcastable to ``[...]`` (``p >= 0``).
    """
    excess = torch.relu(n[..., None].float() * probs - 1.0)                     # [..., S]
    top = excess.amax(-1, keepdim=True)
    p = power[..., None].float()
    ratio = torch.where(top > 0, excess / torch.where(top > 0, top, 1.0), 0.0)
    weights = torch.where(ratio > 0, ratio.clamp(min=1e-38) ** p, 0.0)
    total = weights.sum(-1, keepdim=True)
    keep = (p == 0) | (top <= 0)
    return torch.where(keep, probs, weights / torch.where(total > 0, total, 1.0))


def softplus_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                       sink: torch.Tensor, span: torch.Tensor, scale: float, params: HeadParams,
                       query_chunk: int = 128) -> torch.Tensor:
    """Softplus (or exp) attention with optional re-weighting, over each KV head's sink + window.

    Args:
        q: ``[B, H, Q, D]`` queries (``H`` a multiple of ``Hkv``; query head ``i`` reads KV head
            ``i // (H // Hkv)``), any float dtype.
        k, v: ``[B, Hkv, S, D]`` keys and values in any slot order.
        q_pos: ``[B, Q]`` int64 query positions, -1 for padding.
        k_pos: ``[B, Hk, S]`` int64 key positions (``Hk`` is 1 or ``Hkv``), -1 for empty slots.
        sink: ``[Hkv]`` int64; span: ``[B, Hkv]`` int64 (readable keys as ``sink_window.naive.visible``).
        scale: dot-product scale, usually ``D ** -0.5``.
        params: per-head ``HeadParams``.
        query_chunk: queries per step, bounding memory to ``B * H * query_chunk * S`` floats.

    Returns:
        ``[B, H, Q, D]`` in ``q.dtype``; a query with no readable key (padding) gets zeros.
    """
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    kf, vf = k.float(), v.float()
    out = q.new_zeros(B, H, Q, D)
    softplus = params.softplus.view(1, Hkv, 1, 1, 1)
    power = params.power.view(1, Hkv, 1, 1).float()
    for start in range(0, Q, query_chunk):
        stop = min(Q, start + query_chunk)
        allowed = visible(q_pos[:, start:stop], k_pos, sink, span).expand(B, Hkv, stop - start, -1)   # [B, Hkv, Qc, S]
        n = allowed.sum(-1)                                                                            # [B, Hkv, Qc]
        m = row_scale(n, params)                                                                       # [B, Hkv, Qc]
        qc = q[:, :, start:stop].float().view(B, Hkv, G, stop - start, D)
        scores = torch.einsum("bhgqd,bhsd->bhgqs", qc, kf) * scale                                     # [B, Hkv, G, Qc, S]
        lg = logits(scores * m[:, :, None, :, None], softplus)
        lg = lg.masked_fill(~allowed[:, :, None], float("-inf"))
        probs = torch.softmax(lg, dim=-1).nan_to_num(0.0)                                              # empty rows -> 0
        probs = reweighted(probs, n[:, :, None].expand(B, Hkv, G, -1), power)
        oc = torch.einsum("bhgqs,bhsd->bhgqd", probs, vf)
        out[:, :, start:stop] = oc.reshape(B, H, stop - start, D).to(q.dtype)
    return out
