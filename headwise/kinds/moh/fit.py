"""Fitting ``moh`` routers without retraining the model: cached activations, least squares, a head budget.

Per layer, on the unpatched model's activations over calibration text:

* **Target** of query head ``h`` at token ``t``: how much the layer output moves when the head is
  routed out and replaced by its mean output ``m_h``: ``|| (o_h(t) - m_h) W_o^h ||``, with ``o_h`` the
  head's attention output and ``W_o^h`` its columns of ``o_proj``.
* **Router**: ridge least squares from the pool's RoPE-invariant query pair magnitudes
  (``attention.pair_magnitudes``, standardised, plus a bias) to those targets, one column per
  query head; a token runs the ``top_k`` heads with the highest predicted target.
* **Cost of a layer at** ``k`` heads per token, with the fitted router's top-``k`` choice and
  ``delta_t`` the change of the layer's head outputs it makes at token ``t``:

  - *loss* (the default budget): ``0.5 * mean_t (g_t . delta_t)^2``, the second-order loss change
    with the empirical Fisher, ``g_t`` the gradient of the calibration loss (next-token
    cross-entropy) with respect to the head outputs at ``t`` (one backward pass per sample);
  - *held-out relative error* (diagnostic): ``sum_t ||delta_t W_o||^2 / sum_t ||y_t||^2`` (``y`` the
    layer's dense attention output) on the held-out samples.

  The relative error alone misjudges layers (measured on SmolLM2: it gave layer 24 two heads at a
  90% budget, which alone cost +4.7% perplexity on a 1k document, while two of nine in layer 1 cost
  +0.7%); the loss cost weighs each layer by what its output does to the loss.
* **Budget**: ``active`` x layers x query heads query heads run per token in all, at least
  ``minimum`` per layer, split over the layers to minimise the summed cost (``allocate``, exact).
  A layer given all its heads is written as dense heads (nothing routed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .attention import pair_magnitudes

CAPTURE_NAME = "headwise_moh_capture"


@dataclass
class Activations:
    """One sample's activations of one layer, fp32 CPU: ``features [T, H * D/2]``, ``outputs [T, H, D]``
    and, when captured with gradients, ``grads [T, H, D]`` (the summed next-token loss's gradient
    with respect to ``outputs``)."""

    features: torch.Tensor
    outputs: torch.Tensor
    grads: torch.Tensor | None = None


def capture(model, input_ids: torch.Tensor, gradients: bool = True) -> list[Activations]:
    """Run the unpatched ``model`` (sdpa) on ``input_ids [1, T]``; per layer, the router features of its
    queries (after RoPE, as the patched model will see them), every query head's attention output
    and (``gradients``) the loss gradient at those outputs, from one backward pass of the summed
    next-token cross-entropy (parameters get no gradients). The model's attention implementation
    and its parameters' ``requires_grad`` are restored afterwards."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"moh capture takes one sequence [1, T], got batch {input_ids.shape[0]}.")
    captured: dict[int, Activations] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        act = captured[module.layer_idx] = Activations(pair_magnitudes(query)[0].detach().cpu(),
                                                       out[0].detach().float().cpu())
        if gradients:
            out.register_hook(lambda grad: setattr(act, "grads", grad[0].detach().float().cpu()))
        return out, weights

    def embeddings_need_grad(module, args, output):
        return output.requires_grad_(True)

    AttentionInterface.register(CAPTURE_NAME, attention)
    previous = model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    hook = model.get_input_embeddings().register_forward_hook(embeddings_need_grad) if gradients else None
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        ids = input_ids.to(model.device)
        if gradients:
            for p in model.parameters():
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").backward()
        else:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous or "sdpa")
        if hook is not None:
            hook.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return [captured[i] for i in sorted(captured)]


@dataclass
class LayerRouter:
    """A fitted router of one layer's query heads (all of them: the pool the fitter writes).

    ``router [H * D/2, H]`` and ``bias [H]`` act on raw ``pair_magnitudes`` features; ``fill [H, D]``
    is each head's mean output; ``errors[k]`` the held-out relative error and ``loss[k]`` the
    estimated loss change (nats per token; empty without gradients) with ``k`` heads run per token
    (``k = 0..H``; both 0 at ``k = H``); ``seconds`` the fitting time.
    """

    router: torch.Tensor
    bias: torch.Tensor
    fill: torch.Tensor
    errors: list[float]
    seconds: float
    loss: list[float] = field(default_factory=list)

    @property
    def cost(self) -> list[float]:
        """What the budget minimises: ``loss`` when measured, else ``errors``."""
        return self.loss or self.errors


def _gram(o_proj_weight: torch.Tensor) -> torch.Tensor:
    """``W_o^T W_o`` ``[H*D, H*D]`` fp64: ``||x W_o^T||^2 = x G x^T`` for any head-output row ``x``."""
    w = o_proj_weight.detach().double().cpu()
    return w.T @ w


def _quad(x: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Row-wise ``x G x^T`` for ``x [N, H*D]`` -> ``[N]`` fp64."""
    x = x.double()
    return ((x @ gram) * x).sum(-1)


def head_targets(outputs: torch.Tensor, fill: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``[T, H]``: ``||(o_h - m_h) W_o^h||`` per token and query head (``outputs [T, H, D]``, ``fill [H, D]``)."""
    T, H, D = outputs.shape
    delta = (outputs - fill).double()                                                # [T, H, D]
    blocks = torch.stack([gram[h * D:(h + 1) * D, h * D:(h + 1) * D] for h in range(H)])   # [H, D, D]
    return torch.einsum("thd,hde,the->th", delta, blocks, delta).clamp(min=0).sqrt().float()


def relative_errors(router: torch.Tensor, bias: torch.Tensor, fill: torch.Tensor, data: list[Activations],
                    gram: torch.Tensor) -> list[float]:
    """Held-out relative error of the layer output for ``k = 0..H`` heads run per token (see the module docstring)."""
    H, D = fill.shape
    num = torch.zeros(H + 1, dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for act in data:
        scores = act.features @ router + bias                                        # [T, H]
        order = scores.argsort(dim=-1, descending=True)
        delta = act.outputs - fill                                                   # [T, H, D]
        den += _quad(act.outputs.reshape(len(delta), -1), gram).sum()
        out = torch.ones(len(delta), H, dtype=torch.bool)                            # routed out so far
        for k in range(H + 1):
            num[k] += _quad((delta * out[..., None]).reshape(len(delta), -1), gram).sum()
            if k < H:
                out.scatter_(1, order[:, k:k + 1], False)
    return (num / den.clamp(min=1e-30)).tolist()


def _routings(router: torch.Tensor, bias: torch.Tensor, features: torch.Tensor):
    """For ``k = 0..H``: ``[T, H]`` bool, the heads the router leaves out at ``k`` heads per token."""
    order = (features @ router + bias).argsort(dim=-1, descending=True)
    out = torch.ones(len(features), router.shape[1], dtype=torch.bool)
    for k in range(router.shape[1] + 1):
        yield out
        if k < router.shape[1]:
            out = out.clone().scatter_(1, order[:, k:k + 1], False)


def loss_changes(router: torch.Tensor, bias: torch.Tensor, fill: torch.Tensor, data: list[Activations]) -> list[float]:
    """Estimated loss change per token, ``0.5 * mean_t (g_t . delta_t)^2``, for ``k = 0..H`` (module docstring)."""
    H = fill.shape[0]
    total, tokens = torch.zeros(H + 1, dtype=torch.float64), 0
    for act in data:
        delta = act.outputs - fill                                                   # [T, H, D]
        per_head = (act.grads.double() * delta.double()).sum(-1)                     # [T, H]: g . delta of each head
        for k, out in enumerate(_routings(router, bias, act.features)):
            total[k] += 0.5 * ((per_head * out).sum(-1) ** 2).sum()
        tokens += len(delta)
    return (total / max(tokens, 1)).tolist()


def fit_layer(train: list[Activations], held_out: list[Activations], o_proj_weight: torch.Tensor,
              ridge: float = 1e-3) -> LayerRouter:
    """Fit one layer's router (see the module docstring). ``o_proj_weight [hidden, H * D]``."""
    started = time.perf_counter()
    outputs = torch.cat([a.outputs for a in train])                                 # [N, H, D]
    features = torch.cat([a.features for a in train]).double()                      # [N, F]
    fill = outputs.mean(0)                                                           # [H, D]
    gram = _gram(o_proj_weight)
    targets = head_targets(outputs, fill, gram).double()                            # [N, H]
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std
    lhs = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(lhs, x.T @ (targets - targets.mean(0)))                  # [F, H]
    router = w / std[:, None]
    bias = targets.mean(0) - mean @ router
    router, bias = router.float(), bias.float()
    errors = relative_errors(router, bias, fill, held_out or train, gram)
    everything = train + held_out
    loss = loss_changes(router, bias, fill, everything) if all(a.grads is not None for a in everything) else []
    return LayerRouter(router, bias, fill, errors, time.perf_counter() - started, loss)


def allocate(costs: list[list[float]], budget: int, minimum: int = 1) -> list[int]:
    """Heads run per token in each layer, ``k_l``: ``budget`` in all, at least ``minimum`` per layer,
    minimising ``sum_l costs[l][k_l]`` (``costs[l][k]``: the cost of layer ``l`` at ``k`` heads).

    Exact, by dynamic programming over layers and heads spent (costs need not be convex: a
    layer whose cost only falls at its last head still gets it when that is worth it)."""
    top = [len(c) - 1 for c in costs]
    low = [min(minimum, t) for t in top]
    if not sum(low) <= budget <= sum(top):
        raise ValueError(f"a budget of {budget} query heads per token is outside [{sum(low)}, {sum(top)}] for these "
                         "layers; choose an active fraction between them.")
    best = {0: (0.0, [])}                          # heads spent -> (cost, k per layer so far)
    for cost, lo, hi in zip(costs, low, top):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for spent, (total, ks) in best.items():
            for k in range(lo, hi + 1):
                if spent + k <= budget and (spent + k not in nxt or total + cost[k] < nxt[spent + k][0]):
                    nxt[spent + k] = (total + cost[k], ks + [k])
        best = nxt
    return best[budget][1]


def make_plan(info, routers: list[LayerRouter], top_k: list[int], calibration: dict):
    """A plan whose layer ``l`` runs ``top_k[l]`` query heads per token: every KV head ``moh`` with the
    layer's fitted router (tensors ``moh.l<l>.h<h>.*``), or every KV head dense when ``top_k[l]`` is
    all of the layer's query heads."""
    from ...plan import Plan
    from ..dense import Dense
    from .spec import MoH

    G = info.num_heads // info.num_kv_heads
    rows = G * (info.head_dim // 2)
    layers, weights = [], {}
    for index, (fitted, k) in enumerate(zip(routers, top_k)):
        if k >= info.num_heads:
            layers.append(tuple(Dense() for _ in range(info.num_kv_heads)))
            continue
        heads = []
        for h in range(info.num_kv_heads):
            name = f"moh.l{index}.h{h}"
            weights[f"{name}.router"] = fitted.router[h * rows:(h + 1) * rows].contiguous()
            weights[f"{name}.bias"] = fitted.bias[h * G:(h + 1) * G].contiguous()
            weights[f"{name}.fill"] = fitted.fill[h * G:(h + 1) * G].contiguous()
            heads.append(MoH(top_k=int(k), weights=name))
        layers.append(tuple(heads))
    plan = Plan(info, tuple(layers), calibration, weights=weights)
    plan.validate()
    return plan


def fit_routers(model, train_ids: list[torch.Tensor], held_out_ids: list[torch.Tensor], ridge: float = 1e-3,
                progress=None, gradients: bool = True) -> tuple[list[LayerRouter], float]:
    """Capture every sample (with loss gradients unless ``gradients`` is off), then fit every layer.
    Returns ``(routers, capture_seconds)``.

    ``train_ids``, ``held_out_ids``: ``[1, T]`` token ids each; ``progress(iterable, desc)`` wraps loops
    (e.g. ``tqdm``; default: none)."""
    wrap = progress or (lambda it, desc: it)
    started = time.perf_counter()
    train = [capture(model, ids, gradients) for ids in wrap(train_ids, "capture (train)")]
    held = [capture(model, ids, gradients) for ids in wrap(held_out_ids, "capture (held out)")]
    capture_seconds = time.perf_counter() - started
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    routers = []
    for index in wrap(range(len(train[0])), "fit layers"):
        o_proj = layers[index].self_attn.o_proj.weight
        routers.append(fit_layer([a[index] for a in train], [a[index] for a in held], o_proj, ridge))
    return routers, capture_seconds
