"""``headwise fit lightning`` (and ``headwise fit hybrid``): fit a model's softmax heads' lightning or
hybrid form (Hedgehog feature maps, decay, mixing) to their outputs and convert the best heads.

Example::

    headwise fit lightning --plan d25 --heads auto --fraction 0.25 --out d25-lightning.json
    headwise fit hybrid --plan dense --heads auto --fraction 0.25 --window 64 --sink 64 --out hybrid25.json

Per KV head: its post-RoPE q/k/v are recorded on calibration prose (``calibrate.capture``, the
unpatched model), the head's form is fitted to its softmax outputs (``fit_head``) and the relative
output error on held-out prose is measured; the heads with the lowest error (at most ``--fraction``
of all KV heads, none above ``--max-error``; ``calibrate.select``) are converted in a copy of the
base plan, saved with its tensors as ``<out>.safetensors``. Fitted heads are kept in a
``calibrate.store.Store`` (one safetensors file each), so an interrupted run resumes where it
stopped and a second run at another ``--fraction`` refits nothing.

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..hedgehog import hedgehog_features

HELP = "fit lightning (linear attention) heads to a model's softmax heads and convert the best ones"


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


def head_name(layer: int, head: int) -> str:
    """``"L.H"``: how heads are named on the command line and in the plan's error table."""
    return f"{layer}.{head}"


def parse_heads(text: str, num_layers: int, num_kv_heads: int) -> list[tuple[int, int]] | None:
    """``"auto"`` -> ``None``; ``"0.1,5.2"`` -> ``[(0, 1), (5, 2)]`` (checked against the model)."""
    if text == "auto":
        return None
    heads = []
    for item in text.split(","):
        try:
            layer, head = (int(x) for x in item.strip().split("."))
        except ValueError:
            raise SystemExit(f"--heads must be 'auto' or layer.kv_head pairs such as 0.1,5.2, got {item!r}.") from None
        if not (0 <= layer < num_layers and 0 <= head < num_kv_heads):
            raise SystemExit(f"--heads {item!r} is outside the model's {num_layers} layers x {num_kv_heads} KV heads.")
        heads.append((layer, head))
    return sorted(set(heads))


def choose_heads(errors: dict[tuple[int, int], float], fraction: float | None, max_error: float | None,
                 total_heads: int) -> list[tuple[int, int]]:
    """Heads to convert, in ``(layer, head)`` order: lowest held-out error first, at most
    ``fraction * total_heads`` of them, none with an error above ``max_error`` (either bound may be
    ``None``)."""
    from ...calibrate.select import budget_count, select

    count = None if fraction is None else budget_count(fraction, total_heads)
    return sorted(select(errors, count=count, bound=max_error))


def save_head(store, layer: int, head: int, fitted: FittedHead, seconds: float) -> None:
    """One fitted head into ``store`` (``L<layer>.H<head>.safetensors``, errors in its metadata)."""
    tensors = {"q": fitted.q_weight, "k": fitted.k_weight}
    if fitted.log_mix is not None:
        tensors["log_mix"] = fitted.log_mix
    store.save_tensors(f"L{layer}.H{head}.safetensors", tensors,
                       {"decay": repr(fitted.decay), "error": repr(fitted.error),
                        "train_error": repr(fitted.train_error), "seconds": repr(seconds)})


def load_head(store, layer: int, head: int) -> tuple[FittedHead, float]:
    """``(fitted head, fitting seconds)`` saved by ``save_head``."""
    tensors, meta = store.load_tensors(f"L{layer}.H{head}.safetensors")
    return FittedHead(tensors["q"], tensors["k"], float(meta["decay"]), float(meta["error"]),
                      float(meta["train_error"]), tensors.get("log_mix")), float(meta["seconds"])


def convert(base, fitted: dict[tuple[int, int], FittedHead], heads: list[tuple[int, int]], calibration: dict[str, Any],
            kind: str, make_head: Callable[[FittedHead, str], Any]):
    """``base`` with ``heads`` replaced by ``make_head(fitted head, tensor prefix)`` (a ``kind`` spec;
    prefix ``<kind>.l<layer>.h<head>``) and the fitted tensors (``.q``, ``.k``, ``.log_mix`` when
    fitted) in ``Plan.weights``."""
    import dataclasses

    layers = [list(layer) for layer in base.layers]
    weights = dict(base.weights)
    for layer, head in heads:
        fit = fitted[(layer, head)]
        name = f"{kind}.l{layer}.h{head}"
        layers[layer][head] = make_head(fit, name)
        weights[f"{name}.q"] = fit.q_weight.contiguous()
        weights[f"{name}.k"] = fit.k_weight.contiguous()
        if fit.log_mix is not None:
            weights[f"{name}.log_mix"] = fit.log_mix.contiguous()
    plan = dataclasses.replace(base, layers=tuple(tuple(layer) for layer in layers), calibration=calibration,
                               weights=weights)
    plan.validate()
    return plan


def add_arguments(p) -> None:
    """``headwise fit lightning``'s options (``headwise fit hybrid`` adds ``--window`` and ``--sink``)."""
    p.add_argument("--plan", required=True, help="base plan: JSON path, 'dense' or 'uniform:<density>'")
    p.add_argument("--heads", default="auto",
                   help="'auto' (fit every head without a fitted linear part, convert the best) or a list such as "
                        "0.1,5.2 (layer.kv_head)")
    p.add_argument("--out", required=True, help="output plan JSON (tensors go to the same name with .safetensors)")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: embedded SmolLM2)")
    p.add_argument("--fraction", type=float, default=None,
                   help="convert at most this fraction of all KV heads (auto default 0.25; a list converts all listed)")
    p.add_argument("--replace", default=None,
                   help="with --heads auto: only heads of these base-plan kinds may be converted, e.g. 'window' "
                        "(default: every head without a fitted linear part)")
    p.add_argument("--max-error", type=float, default=None, help="never convert a head whose held-out error is above this")
    p.add_argument("--length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--samples", type=int, default=3, help="training samples (consecutive prose slices)")
    p.add_argument("--held-out", type=int, default=1, help="further samples that measure each head's error")
    p.add_argument("--steps", type=int, default=40, help="Adam steps per head")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    p.add_argument("--feature-dim", type=int, default=128, help="features per Hedgehog map (even)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None,
                   help="where fitted heads are kept (default: ~/.cache/headwise/calibration)")


def run(args) -> int:
    """``headwise fit lightning``."""
    from .spec import Lightning

    return fit_linear(args, "lightning", lambda fit, name: Lightning(decay=float(fit.decay),
                                                                     feature_dim=2 * fit.k_weight.shape[-1],
                                                                     weights=name))


def fit_linear(args, kind: str, make_head: Callable[[FittedHead, str], Any], window: int | None = None,
               sink: int = 0) -> int:
    """Fit (or load) the candidate heads' ``kind`` form and write the plan (the module docstring).

    Args:
        args: the parsed ``add_arguments`` options.
        kind: ``"lightning"`` or a kind fitted the same way with a window (``"hybrid"``): names
            the store, the tensors and the plan's method.
        make_head: ``(fitted head, tensor prefix) -> spec`` of a converted head.
        window, sink: fit with this exact window and sink in place (``None``: no window).
    """
    from tqdm.auto import tqdm

    from ...calibrate.capture import capture
    from ...calibrate.store import Store
    from ...data.prose import corpus_slice
    from ...models import load_model
    from ...plan import Plan
    from .spec import FittedLinearPart

    if args.feature_dim < 2 or args.feature_dim % 2:
        raise SystemExit(f"--feature-dim must be an even number of at least 2, got {args.feature_dim}.")
    if args.fraction is not None and not 0.0 <= args.fraction <= 1.0:
        raise SystemExit(f"--fraction must be between 0 and 1, got {args.fraction}.")
    started = time.perf_counter()
    model, tokenizer = load_model(args.model) if args.model else load_model()
    base = Plan.from_spec(args.plan, model)
    info = base.model
    G = info.num_heads // info.num_kv_heads
    listed = parse_heads(args.heads, info.num_layers, info.num_kv_heads)
    replace = None if args.replace is None else {k.strip() for k in args.replace.split(",") if k.strip()}
    candidates = listed if listed is not None else [
        (i, h) for i, layer in enumerate(base.layers) for h, spec in enumerate(layer)
        if not isinstance(spec, FittedLinearPart) and (replace is None or spec.kind in replace)]
    if not candidates:
        raise SystemExit(f"no head of plan {args.plan!r} may be converted (--replace {args.replace!r}).")
    settings = {"fingerprint": info.fingerprint, "length": args.length, "samples": args.samples,
                "held_out": args.held_out, "steps": args.steps, "lr": args.lr, "feature_dim": args.feature_dim,
                "seed": args.seed, "data": "pydoc_data.topics, consecutive slices from its start"}
    if window is not None:
        settings.update(window=window, sink=sink)
    store = Store.of(args.cache_dir, info.fingerprint, kind, settings)
    todo = [lh for lh in candidates if not store.has(f"L{lh[0]}.H{lh[1]}.safetensors")]
    print(f"fit {kind}: {len(candidates)} candidate heads, {len(candidates) - len(todo)} already fitted in "
          f"{store.directory}")
    if todo:
        count = args.samples + args.held_out
        try:
            ids = corpus_slice(tokenizer, 0, count * args.length)
        except ValueError as error:
            raise SystemExit(f"--samples, --held-out and --length ask for too much text: {error}") from None
        captures = [capture(model, ids[:, i * args.length:(i + 1) * args.length], ("query", "key", "value"))
                    for i in tqdm(range(count), desc="capture q/k/v", unit="sample")]
        scale = getattr(model.config, "head_dim", info.head_dim) ** -0.5
        bar = tqdm(todo, desc="fit heads", unit="head")
        for layer, head in bar:
            def of(c):
                return c[layer].query[head * G:(head + 1) * G], c[layer].key[head], c[layer].value[head]
            t0 = time.perf_counter()
            fitted = fit_head([of(c) for c in captures[:args.samples]], [of(c) for c in captures[args.samples:]],
                              scale, feature_dim=args.feature_dim, steps=args.steps, lr=args.lr, seed=args.seed,
                              window=window, sink=sink)
            save_head(store, layer, head, fitted, time.perf_counter() - t0)
            bar.set_postfix(head=head_name(layer, head), error=f"{fitted.error:.3f}")
    loaded = {lh: load_head(store, *lh) for lh in candidates}
    fitted = {lh: f for lh, (f, _) in loaded.items()}
    errors = {lh: f.error for lh, f in fitted.items()}
    total = info.num_layers * info.num_kv_heads
    fraction = args.fraction if args.fraction is not None else (0.25 if listed is None else None)
    chosen = choose_heads(errors, fraction, args.max_error, total)
    calibration = {
        "method": kind, "base": {"plan": str(args.plan), **base.calibration},
        "fit": {**settings, "fraction": fraction, "max_error": args.max_error, "replace": args.replace,
                "converted": len(chosen), "heads": [head_name(*lh) for lh in chosen],
                "errors": {head_name(*lh): round(e, 5) for lh, e in sorted(errors.items())},
                "fit_seconds": round(sum(s for _, s in loaded.values()), 1)},
        "command": getattr(args, "command_line", None),
        "seconds": round(time.perf_counter() - started, 1)}
    plan = convert(base, fitted, chosen, calibration, kind, make_head)
    plan.save(args.out)
    worst = max((errors[lh] for lh in chosen), default=float("nan"))
    form = kind if window is None else f"{kind} (sink {sink}, window {window})"
    print(f"fit {kind}: converted {len(chosen)} of {total} KV heads to {form} (held-out error <= {worst:.3f}); "
          f"wrote {args.out} and {Path(args.out).with_suffix('.safetensors').name}")
    return 0
