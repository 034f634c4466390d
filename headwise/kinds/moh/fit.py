"""``headwise fit moh``: Mixture-of-Head routers fitted without retraining the model (cached
activations, least squares, a head budget), written as plans at given active-head fractions.

Example::

    headwise fit moh --active 0.9,0.75,0.5 --out 'moh{active}.json'

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

Data: calibration samples (``headwise.data.calibration``: prose with inserted facts and the model's
own answers). Samples and fitted routers are kept in a ``calibrate.store.Store`` (``--cache-dir``),
so another ``--active`` refits nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ...calibrate.capture import capture
from ...calibrate.select import allocate
from .attention import pair_magnitudes

HELP = "fit Mixture-of-Head routers and write moh plans at given active-head fractions"


@dataclass
class Activations:
    """One sample's activations of one layer, fp32 CPU: ``features [T, H * D/2]``, ``outputs [T, H, D]``
    and, when captured with gradients, ``grads [T, H, D]`` (the summed next-token loss's gradient
    with respect to ``outputs``)."""

    features: torch.Tensor
    outputs: torch.Tensor
    grads: torch.Tensor | None = None


def activations(model, input_ids: torch.Tensor, gradients: bool = True) -> list[Activations]:
    """Per layer of the unpatched ``model`` on ``input_ids [1, T]`` (``calibrate.capture``): the
    router features of its queries (after RoPE, as the patched model will see them), every query
    head's attention output and (``gradients``) the next-token loss gradient at those outputs."""
    return [Activations(pair_magnitudes(layer.query[None])[0], layer.output, layer.output_grad)
            for layer in capture(model, input_ids, ("query", "output"), gradients)]


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
    train = [activations(model, ids, gradients) for ids in wrap(train_ids, "capture (train)")]
    held = [activations(model, ids, gradients) for ids in wrap(held_out_ids, "capture (held out)")]
    capture_seconds = time.perf_counter() - started
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    routers = []
    for index in wrap(range(len(train[0])), "fit layers"):
        o_proj = layers[index].self_attn.o_proj.weight
        routers.append(fit_layer([a[index] for a in train], [a[index] for a in held], o_proj, ridge))
    return routers, capture_seconds


def add_arguments(p) -> None:
    """``headwise fit moh``'s options."""
    p.add_argument("--active", required=True,
                   help="fraction(s) of all query heads that run per token, e.g. 0.75 or 0.9,0.75,0.5")
    p.add_argument("--out", required=True,
                   help="output plan JSON; with several --active, a name holding '{active}' (e.g. 'moh{active}.json'); "
                        "tensors go beside it as .safetensors")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: embedded SmolLM2)")
    p.add_argument("--length", type=int, default=1024, help="tokens per calibration sample")
    p.add_argument("--samples", type=int, default=4, help="training samples")
    p.add_argument("--held-out", type=int, default=1, help="further samples that measure each layer's error")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge penalty of the least squares (standardised features)")
    p.add_argument("--min-heads", type=int, default=1, help="query heads every layer runs per token at least")
    p.add_argument("--budget", choices=("loss", "error"), default="loss",
                   help="spread the heads by estimated loss change (default) or by held-out relative output error")
    p.add_argument("--seed", type=int, default=0, help="calibration data seed")
    p.add_argument("--cache-dir", default=None,
                   help="where samples and fitted routers are kept (default: ~/.cache/headwise/calibration)")


def parse_active(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--active must be fractions such as 0.75 or 0.9,0.75,0.5, got {text!r}.") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise SystemExit(f"--active fractions must be in (0, 1], got {text!r}.")
    return values


def save_routers(store, routers: list[LayerRouter], notes: dict) -> None:
    """Routers (``routers.safetensors``) and their costs and timings (``routers.json``) into ``store``."""
    store.save_tensors("routers.safetensors", {f"l{i}.{n}": getattr(r, n) for i, r in enumerate(routers)
                                               for n in ("router", "bias", "fill")})
    store.save_json("routers.json", {"errors": [r.errors for r in routers], "loss": [r.loss for r in routers],
                                     "fit_seconds": [r.seconds for r in routers], **notes})


def load_routers(store) -> tuple[list[LayerRouter], dict]:
    """``(routers, notes)`` saved by ``save_routers``."""
    meta = store.load_json("routers.json")
    tensors, _ = store.load_tensors("routers.safetensors")
    routers = [LayerRouter(tensors[f"l{i}.router"], tensors[f"l{i}.bias"], tensors[f"l{i}.fill"], errors, seconds, loss)
               for i, (errors, seconds, loss) in enumerate(zip(meta["errors"], meta["fit_seconds"], meta["loss"]))]
    return routers, meta


def run(args) -> int:
    """``headwise fit moh``: fit (or load) the routers, then write one plan per ``--active``."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from ...calibrate.store import Store
    from ...data.calibration import SampleBuilder, data_description
    from ...models import load_model
    from ...plan import ModelInfo

    actives = parse_active(args.active)
    if len(actives) > 1 and "{active}" not in args.out:
        raise SystemExit("with several --active fractions, --out must hold '{active}', e.g. 'moh{active}.json'.")
    if args.samples < 1 or args.held_out < 0 or args.length < 256:
        raise SystemExit("fit moh needs --samples >= 1, --held-out >= 0 and --length >= 256.")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model) if args.model else load_model()
    info = ModelInfo.of(model)
    settings = {"version": 2, "fingerprint": info.fingerprint, "length": args.length, "samples": args.samples,
                "held_out": args.held_out, "ridge": args.ridge, "seed": args.seed,
                "data": {k: v for k, v in data_description().items() if k in ("source", "sha256", "mix")}}
    store = Store.of(args.cache_dir, info.fingerprint, "moh", settings)
    if store.has("routers.safetensors") and store.has("routers.json"):
        routers, meta = load_routers(store)
        data_seconds, capture_seconds = meta["data_seconds"], meta["capture_seconds"]
        print(f"fit moh: routers of {len(routers)} layers already fitted in {store.directory}")
    else:
        t0 = time.perf_counter()
        if store.has("samples.safetensors"):
            ids = [t[None] for t in store.load_tensors("samples.safetensors")[0]["ids"]]
        else:
            builder = SampleBuilder(model, tokenizer, seed=args.seed)
            ends = builder.offsets(args.length, args.samples + args.held_out)
            ids = [builder.build(args.length, i, end).input_ids.cpu()
                   for i, end in enumerate(tqdm(ends, desc="calibration samples", unit="sample"))]
            store.save_tensors("samples.safetensors", {"ids": torch.cat(ids)})
        data_seconds = time.perf_counter() - t0
        routers, capture_seconds = fit_routers(model, ids[:args.samples], ids[args.samples:], args.ridge,
                                               progress=lambda it, desc: tqdm(it, desc=desc))
        save_routers(store, routers, {"data_seconds": data_seconds, "capture_seconds": capture_seconds})
    fit_seconds = sum(r.seconds for r in routers)
    errors = [r.errors for r in routers]
    costs = [r.loss if args.budget == "loss" else r.errors for r in routers]
    for active in actives:
        budget = round(active * info.num_layers * info.num_heads)
        try:
            top_k = allocate(costs, budget, args.min_heads)
        except ValueError as error:
            raise SystemExit(f"--active {active}: {error}") from None
        calibration = {
            "method": "moh", "density": 1.0, "active": active,
            "active_query_heads_per_token": sum(top_k), "query_heads": info.num_layers * info.num_heads,
            "top_k": top_k, "held_out_error": [round(e[k], 5) for e, k in zip(errors, top_k)],
            "loss_change": [round(r.loss[k], 6) for r, k in zip(routers, top_k)],
            "moh": {**settings, "min_heads": args.min_heads, "budget": args.budget},
            "command": getattr(args, "command_line", None),
            "seconds": {"samples": round(data_seconds, 1), "capture": round(capture_seconds, 1),
                        "fit": round(fit_seconds, 2), "per_layer_fit": round(fit_seconds / len(routers), 3),
                        "total": round(time.perf_counter() - started, 1)}}
        plan = make_plan(info, routers, top_k, calibration)
        out = args.out.replace("{active}", f"{active:g}")
        plan.save(out)
        routed = sum(k < info.num_heads for k in top_k)
        mean_error = sum(e[k] for e, k in zip(errors, top_k)) / len(errors)
        loss = sum(r.loss[k] for r, k in zip(routers, top_k))
        print(f"fit moh: --active {active:g}: {sum(top_k)} of {info.num_layers * info.num_heads} query heads per "
              f"token, {routed} routed layers, mean held-out error {mean_error:.4f}, estimated loss change "
              f"{loss:+.4f} nats/token; wrote {out} and {Path(out).with_suffix('.safetensors').name}")
    print(f"fit moh: samples {data_seconds:.1f} s, capture {capture_seconds:.1f} s, fit {fit_seconds:.2f} s "
          f"({fit_seconds / len(routers):.3f} s per layer)")
    return 0
