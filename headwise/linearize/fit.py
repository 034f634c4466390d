"""Fit one KV head's lightning or hybrid form (Hedgehog feature maps, decay, mixing) to its softmax outputs.

For a KV head with ``G`` query heads the target is each query head's causal softmax output
``o = softmax(q k^T * scale) v`` on calibration text (over *all* keys, also for a hybrid head).

* ``lightning``: ``o' = (A v) / (A 1)`` with ``A = (phi_q(q) phi_k(k)^T) * lambda^(t-s)`` (causal),
  the quadratic form of exactly what ``headwise.kernels.lightning`` computes by blocks.
* ``hybrid`` (``window`` set): the same linear weights, times ``mu = exp(log_mix)``, on the keys
  older than the window (and past the sink), plus ``exp(a - m)`` on the sink and window keys, one
  normaliser: the quadratic form of ``headwise.kinds.hybrid`` (``Hybrid``'s docstring). The window
  is in place while fitting, so the feature maps learn only what the window does not cover.

The loss is the output MSE relative to the target's mean square (LoLCATs-style output matching,
Hedgehog feature maps); Adam on ``W_q [G, D, F/2]``, ``W_k [D, F/2]``, ``logit(lambda)`` and, for
a hybrid head, ``log_mix [G]``. The reported ``error`` is the same relative MSE on held-out samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kinds.hedgehog import hedgehog_features


@dataclass
class FittedHead:
    """Result of ``fit_head``: tensors for the plan's safetensors file and the measured errors."""

    q_weight: torch.Tensor     # [G, D, F/2] fp32
    k_weight: torch.Tensor     # [D, F/2] fp32
    decay: float
    error: float               # relative output MSE on held-out samples
    train_error: float
    log_mix: torch.Tensor | None = None    # [G] fp32, hybrid heads only


def softmax_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention: ``q [G, T, D]``, ``k, v [T, D]`` -> ``[G, T, D]`` fp32."""
    T = q.shape[1]
    scores = (q @ k.T) * scale
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def linear_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, log_decay: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised decayed linear attention, quadratic form: ``q [G, T, D]``, ``k, v [T, D]`` -> ``[G, T, D]``
    (only the query positions ``rows`` when given: ``[G, len(rows), D]``)."""
    T = k.shape[0]
    t = torch.arange(T, dtype=torch.float32)
    if rows is not None:
        q = q[:, rows]
    fq = hedgehog_features(q[None], q_weight)[0]                       # [G, Tq, F]
    fk = hedgehog_features(k[None, None], k_weight[None])[0, 0]        # [T, F]
    lag = (t if rows is None else rows.float())[:, None] - t[None, :]
    causal = lag >= 0
    decay = torch.where(causal, lag.clamp(min=0) * log_decay, float("-inf")).exp()   # [T, T]
    weights = (fq @ fk.T) * decay
    return (weights @ v) / (weights.sum(-1, keepdim=True) + 1e-6)


def hybrid_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                   k_weight: torch.Tensor, log_decay: torch.Tensor, log_mix: torch.Tensor, sink: int, window: int,
                   scale: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Hybrid head, quadratic form: ``q [G, T, D]``, ``k, v [T, D]``, ``log_mix [G]`` -> ``[G, T, D]``
    (only the query positions ``rows`` when given: ``[G, len(rows), D]``)."""
    T = k.shape[0]
    s = torch.arange(T)[None, :]
    t = (torch.arange(T) if rows is None else rows)[:, None]
    if rows is not None:
        q = q[:, rows]
    exact = (s <= t) & ((s < sink) | (s > t - window))
    linear = (s >= sink) & (s <= t - window)
    scores = ((q @ k.T) * scale).masked_fill(~exact, float("-inf"))              # [G, Tq, T]
    soft = torch.exp(scores - scores.amax(-1, keepdim=True))
    fq = hedgehog_features(q[None], q_weight)[0]
    fk = hedgehog_features(k[None, None], k_weight[None])[0, 0]
    decay = torch.where(linear, (t - s).clamp(min=0).float() * log_decay, float("-inf")).exp()
    weights = soft + (fq @ fk.T) * decay * log_mix.exp()[:, None, None]
    return (weights @ v) / weights.sum(-1, keepdim=True)


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean() / (target ** 2).mean().clamp(min=1e-12)


def fit_head(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], held_out: list[tuple], scale: float,
             feature_dim: int = 128, steps: int = 150, lr: float = 0.01, init_decay: float = 0.995,
             seed: int = 0, queries_per_step: int | None = 128, window: int | None = None,
             sink: int = 0) -> FittedHead:
    """Fit one KV head.

    Args:
        samples: training sequences, each ``(q [G, T, D], k [T, D], v [T, D])`` fp32 (post-RoPE).
        held_out: sequences in the same form, for the reported error (not trained on).
        scale: the model's softmax scale.
        feature_dim: features ``F`` per map; steps, lr: Adam steps (all samples each) and rate.
        init_decay: starting ``lambda``.
        queries_per_step: query positions per sample in each training step (a random subset, which
            cuts the ``T x T`` work; ``None``: all). The reported errors use every position.
        window, sink: fit a ``hybrid`` head with this exact window and sink (``None``: ``lightning``).

    Returns:
        ``FittedHead``.
    """
    G, _, D = samples[0][0].shape
    half = feature_dim // 2
    g = torch.Generator().manual_seed(seed)
    # start near a (scaled) identity: features follow the coordinates of q and k
    base = torch.zeros(D, half)
    base[torch.arange(min(D, half)), torch.arange(min(D, half))] = 1.0
    q_weight = (base * math.sqrt(scale) * 4 + 0.02 * torch.randn(G, D, half, generator=g)).requires_grad_()
    k_weight = (base * math.sqrt(scale) * 4 + 0.02 * torch.randn(D, half, generator=g)).requires_grad_()
    decay_logit = torch.tensor(math.log(init_decay / (1 - init_decay))).requires_grad_()
    log_mix = torch.zeros(G).requires_grad_()          # LoLCATs starts softmax and linear parts at equal weight
    targets = [softmax_outputs(q, k, v, scale) for q, k, v in samples]
    opt = torch.optim.Adam([q_weight, k_weight, decay_logit] + ([log_mix] if window is not None else []), lr=lr)

    def predict(q, k, v, log_decay, rows):
        if window is None:
            return linear_outputs(q, k, v, q_weight, k_weight, log_decay, rows)
        return hybrid_outputs(q, k, v, q_weight, k_weight, log_decay, log_mix, sink, window, scale, rows)

    def loss_on(data, outs, subset: bool = False):
        log_decay = torch.nn.functional.logsigmoid(decay_logit)
        total = 0.0
        for (q, k, v), target in zip(data, outs):
            T = k.shape[0]
            rows = None
            if subset and queries_per_step is not None and queries_per_step < T:
                rows = torch.randperm(T, generator=g)[:queries_per_step].sort().values
            pred = predict(q, k, v, log_decay, rows)
            total = total + relative_error(pred, target if rows is None else target[:, rows])
        return total / len(data)

    for _ in range(steps):
        opt.zero_grad()
        loss = loss_on(samples, targets, subset=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        train_error = float(loss_on(samples, targets))
        held_targets = [softmax_outputs(q, k, v, scale) for q, k, v in held_out]
        error = float(loss_on(held_out, held_targets)) if held_out else train_error
    return FittedHead(q_weight.detach().clone(), k_weight.detach().clone(), float(torch.sigmoid(decay_logit.detach())),
                      error, train_error, None if window is None else log_mix.detach().clone())
