"""``headwise moh-fit``: fit Mixture-of-Head routers to a model and write plans at given active-head fractions.

Example::

    headwise moh-fit --active 0.9,0.75,0.5 --out 'moh{active}.json'

The unpatched model runs on calibration samples (``headwise.calibrate.data``: prose with inserted
facts and the model's own answers), every layer's router is fitted by least squares
(``headwise.kinds.moh.fit``), and the query heads run per token are spread over the layers by
held-out error. Fitted routers are kept in ``--work-dir`` (one safetensors file + JSON per
settings), so another ``--active`` refits nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("moh-fit", help="fit Mixture-of-Head routers and write moh plans",
                              description=__doc__.split("\n")[0])
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
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--work-dir", default=None, help="fitted-router cache (default: <out>.moh/)")
    p.set_defaults(func=moh_fit_command)


def parse_active(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--active must be fractions such as 0.75 or 0.9,0.75,0.5, got {text!r}.") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise SystemExit(f"--active fractions must be in (0, 1], got {text!r}.")
    return values


def moh_fit_command(args) -> int:
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ...calibrate.data import SampleBuilder, data_description
    from ...models import load_model
    from ...plan import ModelInfo
    from .fit import LayerRouter, allocate, fit_routers, make_plan

    actives = parse_active(args.active)
    if len(actives) > 1 and "{active}" not in args.out:
        raise SystemExit("with several --active fractions, --out must hold '{active}', e.g. 'moh{active}.json'.")
    if args.samples < 1 or args.held_out < 0 or args.length < 256:
        raise SystemExit("moh-fit needs --samples >= 1, --held-out >= 0 and --length >= 256.")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model) if args.model else load_model()
    info = ModelInfo.of(model)
    settings = {"version": 2, "fingerprint": info.fingerprint, "length": args.length, "samples": args.samples,
                "held_out": args.held_out, "ridge": args.ridge, "seed": args.seed,
                "data": {k: v for k, v in data_description().items() if k in ("source", "sha256", "mix")}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    work = Path(args.work_dir) if args.work_dir else Path(args.out.replace("{active}", "")).with_suffix(".moh")
    tensors_path, meta_path = work / f"{key}.safetensors", work / f"{key}.json"
    if tensors_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        tensors = load_file(tensors_path)
        routers = [LayerRouter(tensors[f"l{i}.router"], tensors[f"l{i}.bias"], tensors[f"l{i}.fill"], errors, seconds,
                               loss) for i, (errors, seconds, loss) in
                   enumerate(zip(meta["errors"], meta["fit_seconds"], meta["loss"]))]
        data_seconds, capture_seconds = meta["data_seconds"], meta["capture_seconds"]
        print(f"moh-fit: routers of {len(routers)} layers already fitted in {tensors_path}")
    else:
        t0 = time.perf_counter()
        samples_path = work / f"{key}.samples.safetensors"
        if samples_path.is_file():
            ids = [t[None] for t in load_file(samples_path)["ids"]]
        else:
            builder = SampleBuilder(model, tokenizer, seed=args.seed)
            count = args.samples + args.held_out
            ends = builder.offsets(args.length, count)
            ids = [builder.build(args.length, i, end).input_ids.cpu()
                   for i, end in enumerate(tqdm(ends, desc="calibration samples", unit="sample"))]
            work.mkdir(parents=True, exist_ok=True)
            save_file({"ids": torch.cat(ids)}, samples_path)
        data_seconds = time.perf_counter() - t0
        routers, capture_seconds = fit_routers(model, ids[:args.samples], ids[args.samples:], args.ridge,
                                               progress=lambda it, desc: tqdm(it, desc=desc))
        work.mkdir(parents=True, exist_ok=True)
        save_file({f"l{i}.{n}": getattr(r, n).contiguous() for i, r in enumerate(routers)
                   for n in ("router", "bias", "fill")}, tensors_path)
        meta_path.write_text(json.dumps({"settings": settings, "errors": [r.errors for r in routers],
                                         "loss": [r.loss for r in routers],
                                         "fit_seconds": [r.seconds for r in routers], "data_seconds": data_seconds,
                                         "capture_seconds": capture_seconds}, indent=1))
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
            "moh": {**settings, "min_heads": args.min_heads, "budget": args.budget,
                    "command": getattr(args, "command_line", None)},
            "seconds": {"samples": round(data_seconds, 1), "capture": round(capture_seconds, 1),
                        "fit": round(fit_seconds, 2), "per_layer_fit": round(fit_seconds / len(routers), 3),
                        "total": round(time.perf_counter() - started, 1)}}
        plan = make_plan(info, routers, top_k, calibration)
        out = args.out.replace("{active}", f"{active:g}")
        plan.save(out)
        routed = sum(k < info.num_heads for k in top_k)
        mean_error = sum(e[k] for e, k in zip(errors, top_k)) / len(errors)
        loss = sum(r.loss[k] for r, k in zip(routers, top_k))
        print(f"moh-fit: --active {active:g}: {sum(top_k)} of {info.num_layers * info.num_heads} query heads per "
              f"token, {routed} routed layers, mean held-out error {mean_error:.4f}, estimated loss change "
              f"{loss:+.4f} nats/token; wrote {out} and {Path(out).with_suffix('.safetensors').name}")
    print(f"moh-fit: samples {data_seconds:.1f} s, capture {capture_seconds:.1f} s, fit {fit_seconds:.2f} s "
          f"({fit_seconds / len(routers):.3f} s per layer)")
    return 0
