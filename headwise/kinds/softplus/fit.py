"""``headwise fit softplus``: choose the heads (and each head's power ``p``) that get softplus-kind
re-weighting, on calibration prose.

``headwise fit softplus --out plan.json`` (embedded model by default). A
softmax-trained model read past its trained context ``L`` spreads its attention over more keys
(entropy grows with ``log n``); the re-weighting ``ReLU(n A - 1)^p`` removes every weight below the
uniform ``1/n`` and sharpens the rest. Which heads gain from it is measured, not assumed:

1. **Statistics** (one forward of the unpatched model over ``length`` tokens of calibration prose,
   ``length > L``): for ``rows`` query rows inside the context (positions ``[L/2, L)``) and ``rows``
   beyond it (``[L, length)``), every KV head's attention entropy (mean over its query heads)
   without re-weighting and with each candidate power. Entropy invariance asks a head to keep the
   entropy it has inside the context, so each head's power is the candidate whose beyond-context
   entropy is closest to its own inside-context entropy without re-weighting, and its *gain* is how
   much closer that brings it, less how far the same power moves its inside-context entropy
   (re-weighting applies to every row, so that is its in-context cost).
2. **Choice by perplexity**: for each ``fraction``, the heads with the largest positive gain (at
   most that fraction of all KV heads) become ``softplus`` heads (``exp``, their power, no length
   scale); the rest stay dense. Each candidate plan is scored by the per-token loss of the same
   calibration text beyond ``L``; the plan keeps the best candidate, and all losses are recorded.

The calibration text is the prose corpus (``headwise.data.prose``) from token ``offset``: keep
it apart from evaluation documents (the default 60000..72288 is disjoint from the eval suite's
three 16k perplexity documents of seed 0, which start at tokens 5159, 35658 and 82009).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from ...plan import ModelInfo, Plan
from ..dense.spec import Dense
from .spec import Softplus

HELP = "choose the heads (and powers) that get softplus re-weighting beyond the trained context"
LOSS_CHUNK = 1024


@dataclass
class HeadStats:
    """Mean attention entropy (nats) of one KV head: ``inside[p]`` / ``beyond[p]`` per candidate power
    (``p = 0``: no re-weighting)."""

    inside: dict[float, float]
    beyond: dict[float, float]


def reweighted_entropy(probs: torch.Tensor, n: torch.Tensor, power: float) -> torch.Tensor:
    """Entropy of rows ``probs [..., S]`` after ``ReLU(n A - 1)^p`` renormalised (``p = 0``: of ``probs``)."""
    if power > 0:
        w = torch.relu(n[..., None] * probs - 1.0)
        w = (w / w.amax(-1, keepdim=True).clamp(min=1e-30)) ** power
        probs = torch.where(w.sum(-1, keepdim=True) > 0, w / w.sum(-1, keepdim=True).clamp(min=1e-30), probs)
    return -(probs * torch.log(probs.clamp(min=1e-30))).sum(-1)


def rows_of(lo: int, hi: int, count: int) -> torch.Tensor:
    """``count`` query positions spread evenly over ``[lo, hi)``."""
    return torch.unique(torch.linspace(lo, hi - 1, count).round().long())


class StatsCollector:
    """Observer for ``calibrate.capture.observing`` (the model runs unchanged): entropy statistics of
    sampled rows (``query [1, H, T, D]`` post-RoPE; keys at positions ``0..T-1``)."""

    def __init__(self, num_layers: int, num_kv_heads: int, inside: torch.Tensor, beyond: torch.Tensor,
                 powers: tuple[float, ...]):
        self.inside, self.beyond, self.powers = inside, beyond, (0.0, *powers)
        self.sums = torch.zeros(num_layers, num_kv_heads, 2, len(self.powers), dtype=torch.float64)

    def __call__(self, layer: int, query, key, value, output, scaling) -> None:
        H, Hkv = query.shape[1], key.shape[1]
        G = H // Hkv
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        for region, rows in enumerate((self.inside, self.beyond)):
            q = query[0, :, rows].float().view(Hkv, G, len(rows), -1)                     # [Hkv, G, R, D]
            scores = torch.einsum("hgrd,hsd->hgrs", q, key[0].float()) * scale
            causal = torch.arange(key.shape[2])[None, :] <= rows[:, None]                 # [R, S]
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            n = (rows + 1).float().expand(Hkv, G, -1)
            for j, p in enumerate(self.powers):
                entropy = reweighted_entropy(probs, n, p)                                 # [Hkv, G, R]
                self.sums[layer, :, region, j] += entropy.double().mean((1, 2))

    def stats(self) -> list[list[HeadStats]]:
        return [[HeadStats(dict(zip(self.powers, head[0].tolist())), dict(zip(self.powers, head[1].tolist())))
                 for head in layer] for layer in self.sums]


def choose_powers(stats: list[list[HeadStats]]) -> list[list[tuple[float, float]]]:
    """Per head ``(power, gain)``: the power whose beyond-context entropy is nearest the head's own
    inside-context entropy, and the gain (entropy-gap closed beyond the context minus the gap opened inside)."""
    chosen = []
    for layer in stats:
        row = []
        for head in layer:
            target = head.inside[0.0]
            gap = abs(head.beyond[0.0] - target)
            power = min(head.beyond, key=lambda p: abs(head.beyond[p] - target))
            gain = gap - abs(head.beyond[power] - target) - abs(head.inside[power] - target)
            row.append((power, gain if power > 0 else 0.0))
        chosen.append(row)
    return chosen


def plan_for(model, chosen, fraction: float, trained: int) -> tuple[Plan, int]:
    """The plan re-weighting the heads with the largest positive gain, at most ``fraction`` of all
    (``calibrate.select``)."""
    from ...calibrate.select import budget_count, select

    info = ModelInfo.of(model)
    gains = {(i, h): g for i, layer in enumerate(chosen) for h, (_, g) in enumerate(layer)}
    keep = set(select(gains, count=budget_count(fraction, info.num_layers * info.num_kv_heads), highest=True,
                      bound=0.0))
    layers = tuple(tuple(Softplus(nonlinearity="exp", scale="none", scale_length=trained, power=float(p))
                         if (i, h) in keep else Dense() for h, (p, _) in enumerate(layer))
                   for i, layer in enumerate(chosen))
    return Plan(info, layers, {}), len(keep)


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``[T - 1]`` per-token cross-entropy of ``input_ids [1, T]`` (logits made ``LOSS_CHUNK`` rows at a time)."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[0]
    out = []
    for start in range(0, input_ids.shape[1] - 1, LOSS_CHUNK):
        logits = model.lm_head(hidden[start:min(start + LOSS_CHUNK, input_ids.shape[1] - 1)]).float()
        target = input_ids[0, start + 1:start + 1 + logits.shape[0]]
        out.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    return torch.cat(out)


@torch.no_grad()
def fit(model, input_ids: torch.Tensor, trained: int, powers=(1.0, 3.0, 15.0), fractions=(0.1, 0.25),
        rows: int = 64, log=print) -> Plan:
    """The calibrated plan (see the module docstring) for ``input_ids [1, T]`` with ``T > trained``."""
    from ...calibrate.capture import observing
    from ...patches import patch_model, unpatch_model

    T = input_ids.shape[1]
    if T <= trained:
        raise ValueError(f"calibration text of {T} tokens must be longer than the trained context of {trained}; "
                         "pass a longer --length.")
    info = ModelInfo.of(model)
    inside, beyond = rows_of(trained // 2, trained, rows), rows_of(trained, T, rows)
    collector = StatsCollector(info.num_layers, info.num_kv_heads, inside, beyond, tuple(powers))
    t0 = time.perf_counter()
    with observing(model, collector, name="headwise_softplus_stats"):
        dense_loss = token_losses(model, input_ids)
    log(f"statistics pass over {T} tokens: {time.perf_counter() - t0:.0f} s")
    stats = collector.stats()
    chosen = choose_powers(stats)
    beyond_loss = {"dense": float(dense_loss[trained - 1:].mean())}
    inside_loss = {"dense": float(dense_loss[:trained - 1].mean())}
    candidates = {}
    for fraction in fractions:
        plan, count = plan_for(model, chosen, fraction, trained)
        name = f"top{fraction:g}"
        if count == 0 or any(plan.layers == c.layers for c in candidates.values()):
            log(f"{name}: {count} heads, same as an earlier candidate or none; skipped")
            continue
        patch_model(model, plan)
        try:
            t0 = time.perf_counter()
            loss = token_losses(model, input_ids)
        finally:
            unpatch_model(model)
        beyond_loss[name], inside_loss[name] = float(loss[trained - 1:].mean()), float(loss[:trained - 1].mean())
        candidates[name] = plan
        log(f"{name}: {count} heads re-weighted, loss beyond {trained}: {beyond_loss[name]:.4f} "
            f"(dense {beyond_loss['dense']:.4f}), inside: {inside_loss[name]:.4f} ({time.perf_counter() - t0:.0f} s)")
    best = min(beyond_loss, key=beyond_loss.get)
    base = candidates[best] if best != "dense" else Plan.dense(model)
    calibration = {
        "method": "softplus_fit", "picked": best, "trained_length": trained, "length": T, "rows": rows,
        "powers": list(powers), "fractions": list(fractions),
        "loss_beyond": beyond_loss, "loss_inside": inside_loss,
        "heads": [[{"power": p, "gain": round(g, 5),
                    "entropy_inside": round(s.inside[0.0], 4), "entropy_beyond": round(s.beyond[0.0], 4)}
                   for (p, g), s in zip(layer_c, layer_s)] for layer_c, layer_s in zip(chosen, stats)]}
    plan = Plan(base.model, base.layers, calibration)
    plan.validate()
    return plan


def add_arguments(p) -> None:
    """``headwise fit softplus``'s options."""
    p.add_argument("--model", default=None, help="local checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--length", type=int, default=12288, help="calibration tokens (longer than --trained)")
    p.add_argument("--trained", type=int, default=None, help="trained context (default: max_position_embeddings)")
    p.add_argument("--offset", type=int, default=60000, help="first corpus token of the calibration text")
    p.add_argument("--powers", default="1,3,15", help="candidate re-weighting powers")
    p.add_argument("--fractions", default="0.1,0.25", help="candidate fractions of KV heads to re-weight")
    p.add_argument("--rows", type=int, default=64, help="query rows sampled inside and beyond the context")


def run(args) -> int:
    """``headwise fit softplus``: the module docstring's fit on ``--length`` corpus tokens from ``--offset``."""
    from ...data.prose import SOURCE, corpus_slice
    from ...models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    trained = args.trained or model.config.max_position_embeddings
    try:
        ids = corpus_slice(tokenizer, args.offset, args.length)
    except ValueError as error:
        raise SystemExit(f"{error} Lower --offset or --length.") from None
    plan = fit(model, ids, trained, tuple(float(x) for x in args.powers.split(",")),
               tuple(float(x) for x in args.fractions.split(",")), args.rows)
    plan.calibration["data"] = {"source": SOURCE, "offset": args.offset, "length": args.length}
    plan.calibration["command"] = getattr(args, "command_line", None)
    plan.save(args.out)
    heads = sum(h.kind == "softplus" for h in plan.heads)
    print(f"wrote {args.out}: {heads} softplus heads ({plan.calibration['picked']}); losses beyond "
          f"{trained}: {json.dumps({k: round(v, 4) for k, v in plan.calibration['loss_beyond'].items()})}")
    return 0
