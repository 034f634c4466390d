"""Measurements behind the ``moh`` design choices, on the embedded SmolLM2 (results:
``benchmarks/results/2026-11-27-moh-router-inputs.md`` and ``2026-11-27-moh-budget.md``).

``--router-inputs``: which token features predict, per layer, which query heads matter. On consecutive
1k-token slices of the calibration prose (``headwise.data.prose.corpus_text``, seeded offsets;
3 to fit, 1 held out), every layer's held-out relative output error ``sum_t ||y_t - yhat_t||^2 /
sum_t ||y_t||^2`` when each token runs ``k`` of its 9 query heads, routed out heads replaced by
their mean output (``mean``) or by zero (``zero``), for: the oracle top-k (true targets), a fixed
head set (best on average), MoH-LLaMA3's parameter-free rule (largest query norms), and ridge
least squares from the per-head query norms, the query pair magnitudes of the whole layer, those
of the head's own KV group only, and the attention input hidden states. Prints the mean over layers.

``--budgets STORE_DIR``: perplexity of one 1k-token eval document (``headwise.eval.tasks.perplexity``,
seed 0) with plans made from the routers ``headwise fit moh`` keeps (its store folder,
``<cache-dir>/<model>-moh-<key>/``), the layer budget split by
estimated loss change or by held-out relative error, and single-layer probes (``--single L:K``).

    OMP_NUM_THREADS=1 python scripts/probe_moh.py --router-inputs
    OMP_NUM_THREADS=1 python scripts/probe_moh.py --budgets /tmp/moh/cache/*-moh-* --active 0.9,0.75,0.5 --single 24:2,1:2
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python scripts/probe_moh.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402


def router_inputs(model, tokenizer, length: int = 1024, slices: int = 4) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from headwise.data.prose import corpus_text

    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    Hkv, D = model.config.num_key_value_heads, model.config.head_dim
    G = H // Hkv
    corpus = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    rng = random.Random(0)
    ends = [rng.randrange(length, len(corpus)) for _ in range(slices)]
    captured: dict[int, dict] = {}

    def attention(module, q, k, v, mask, **kwargs):
        out, w = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        half = D // 2
        captured[module.layer_idx]["pairs"] = torch.sqrt(q[0, :, :, :half] ** 2 + q[0, :, :, half:] ** 2).transpose(0, 1)
        captured[module.layer_idx]["o"] = out[0].detach().float()                  # [T, H, D]
        return out, w

    def pre(module, args, kwargs):
        captured.setdefault(module.layer_idx, {})["x"] = kwargs["hidden_states"][0].detach().float()

    hooks = [layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True) for layer in model.model.layers]
    AttentionInterface.register("headwise_probe", attention)
    model.set_attn_implementation("headwise_probe")
    data = []
    try:
        for end in ends:
            captured = {}
            with torch.no_grad():
                model(input_ids=torch.tensor([corpus[end - length:end]]))
            data.append(captured)
    finally:
        model.set_attn_implementation("sdpa")
        for h in hooks:
            h.remove()
    train, test = data[:-1], data[-1]
    results: dict[tuple, list[float]] = {}

    def ridge(x_train, y, x_test):
        mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
        a = (x_train - mean) / std
        w = torch.linalg.solve((a.T @ a + 1e-3 * len(a) * torch.eye(a.shape[1])).double(),
                               (a.T @ (y - y.mean(0))).double()).float()
        return ((x_test - mean) / std) @ w + y.mean(0)

    for l in range(L):
        wo = model.model.layers[l].self_attn.o_proj.weight.detach().float().view(-1, H, D)
        contrib = lambda c: torch.einsum("thd,ehd->the", c[l]["o"], wo)                    # noqa: E731
        c_train, c_test = [contrib(c) for c in train], contrib(test)
        mean = torch.cat(c_train).mean(0)
        for fill_name in ("mean", "zero"):
            fill = mean if fill_name == "mean" else torch.zeros_like(mean)
            y_train = torch.cat([(c - fill).norm(dim=-1) for c in c_train])               # [N, H]
            y = c_test.sum(1)
            feats = {"norms": lambda c: c[l]["pairs"].norm(dim=-1),
                     "pairs": lambda c: c[l]["pairs"].reshape(len(c[l]["pairs"]), -1),
                     "hidden": lambda c: c[l]["x"]}
            scores = {"oracle": (c_test - fill).norm(dim=-1),
                      "fixed heads": y_train.mean(0).expand(len(c_test), H),
                      "query norms, no fit (MoH-LLaMA3)": test[l]["pairs"].norm(dim=-1)}
            for name, f in feats.items():
                scores[f"ridge on {name}"] = ridge(torch.cat([f(c) for c in train]), y_train, f(test))
            own = torch.empty(len(c_test), H)
            for h in range(H):
                heads = list(range(h // G * G, (h // G + 1) * G))
                own[:, h] = ridge(torch.cat([c[l]["pairs"][:, heads].reshape(-1, len(heads) * D // 2) for c in train]),
                                  y_train[:, h:h + 1], test[l]["pairs"][:, heads].reshape(-1, len(heads) * D // 2))[:, 0]
            scores["ridge on pairs, own KV group only"] = own
            for k in (8, 7, 5, 4):
                for name, s in scores.items():
                    chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=-1).indices, True)
                    approx = torch.where(chosen[..., None], c_test, fill).sum(1)
                    err = float(((y - approx).norm(dim=-1) ** 2).sum() / (y.norm(dim=-1) ** 2).sum())
                    results.setdefault((fill_name, name), {}).setdefault(k, []).append(err)
    print(f"held-out relative error of the layer output, mean over {L} layers ({slices - 1} x {length} tokens to fit, "
          f"1 held out)\n")
    print("| routed-out heads give | router | 8 of 9 | 7 of 9 | 5 of 9 | 4 of 9 |")
    print("|---|---|---:|---:|---:|---:|")
    for (fill_name, name), by_k in results.items():
        print(f"| {fill_name} | {name} | " + " | ".join(f"{statistics.mean(by_k[k]):.4f}" for k in (8, 7, 5, 4)) + " |")


def budgets(model, tokenizer, work: str, actives: list[float], singles: list[str]) -> None:
    from benchmarks.moh import perplexity_trial
    from headwise.calibrate.select import allocate
    from headwise.calibrate.store import Store
    from headwise.eval import tasks
    from headwise.kinds.moh.fit import load_routers, make_plan
    from headwise.plan import ModelInfo

    info = ModelInfo.of(model)
    routers, _ = load_routers(Store(work, {}))
    doc = tasks.generate("perplexity", tokenizer, 1024, 1, 0)[0].prompt
    H, L = info.num_heads, info.num_layers
    rows = {"dense": [H] * L}
    for active in actives:
        for cost in ("loss", "error"):
            costs = [r.loss if cost == "loss" else r.errors for r in routers]
            rows[f"{active:g} by {cost}"] = allocate(costs, round(active * L * H))
    for single in singles:
        layer, k = (int(x) for x in single.split(":"))
        rows[f"only layer {layer} at {k}"] = [k if i == layer else H for i in range(L)]
    base = None
    for name, top_k in rows.items():
        nll, count = perplexity_trial(model, tokenizer, make_plan(info, routers, top_k, {"method": "moh"}), doc)
        ppl = math.exp(nll / count)
        base = base or ppl
        print(f"{name}: ppl {ppl:.3f} ({ppl / base - 1:+.1%}); top_k {top_k}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router-inputs", action="store_true")
    parser.add_argument("--budgets", default=None, help="the store folder of headwise fit moh's routers")
    parser.add_argument("--active", default="0.9,0.75,0.5")
    parser.add_argument("--single", default="", help="layer:k probes, e.g. 24:2,1:2")
    args = parser.parse_args()
    from headwise import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model()
    if args.router_inputs:
        router_inputs(model, tokenizer)
    if args.budgets:
        budgets(model, tokenizer, args.budgets, [float(a) for a in args.active.split(",")],
                [s for s in args.single.split(",") if s])


if __name__ == "__main__":
    main()
