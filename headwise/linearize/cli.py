"""``headwise linearize``: fit lightning or hybrid heads to a model's softmax heads and convert the best ones.

Example::

    headwise linearize --plan plans/d25.json --heads auto --fraction 0.25 --out d25-lightning.json
    headwise linearize --plan dense --heads auto --fraction 0.25 --window 64 --sink 64 --out hybrid25.json

Per KV head: its post-RoPE q/k/v are recorded on calibration prose (the unpatched model), a Hedgehog
feature map and a decay are fitted to its softmax outputs (``headwise.linearize.fit``) and the
relative output error on held-out prose is measured; the heads with the lowest error (at most
``--fraction`` of all KV heads, none above ``--max-error``) become ``lightning`` heads (``hybrid``
heads with ``--window``: sink + exact window + linear part, fitted with the window in place) in a
copy of the base plan, saved with its tensors as ``<out>.safetensors``. Fitted heads are kept in
``--work-dir`` (one safetensors file each), so an interrupted run resumes where it stopped and a
second run at another ``--fraction`` refits nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("linearize", help="fit lightning (linear attention) heads and convert the best ones",
                              description=__doc__.split("\n")[0])
    p.add_argument("--plan", required=True, help="base plan: JSON path, 'dense' or 'uniform:<density>'")
    p.add_argument("--heads", default="auto",
                   help="'auto' (fit every non-lightning head, convert the best) or a list such as 0.1,5.2 (layer.kv_head)")
    p.add_argument("--out", required=True, help="output plan JSON (tensors go to the same name with .safetensors)")
    p.add_argument("--model", default=None,
                   help="model name (headwise model list) or local checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--fraction", type=float, default=None,
                   help="convert at most this fraction of all KV heads (auto default 0.25; a list converts all listed)")
    p.add_argument("--replace", default=None,
                   help="with --heads auto: only heads of these base-plan kinds may be converted, e.g. 'window' "
                        "(default: every non-lightning head)")
    p.add_argument("--max-error", type=float, default=None, help="never convert a head whose held-out error is above this")
    p.add_argument("--length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--samples", type=int, default=3, help="training samples (consecutive prose slices)")
    p.add_argument("--held-out", type=int, default=1, help="further samples that measure each head's error")
    p.add_argument("--steps", type=int, default=40, help="Adam steps per head")
    p.add_argument("--lr", type=float, default=0.02, help="Adam learning rate")
    p.add_argument("--feature-dim", type=int, default=128, help="features per Hedgehog map (even)")
    p.add_argument("--window", type=int, default=None,
                   help="make hybrid heads: exact softmax over the last WINDOW keys (and the sink), linear attention "
                        "over older ones, fitted with the window in place (default: pure lightning heads)")
    p.add_argument("--sink", type=int, default=0, help="with --window: exact keys kept at the start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="fitted-head cache (default: <out>.linearize/)")
    p.set_defaults(func=linearize_command)


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


def linearize_command(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..kinds.hybrid import Hybrid
    from ..kinds.lightning import Lightning
    from ..models import load_model
    from ..plan import Plan
    from .capture import capture_qkv
    from .convert import choose_heads, convert, head_name
    from .fit import fit_head
    from .store import HeadStore

    if args.feature_dim < 2 or args.feature_dim % 2:
        raise SystemExit(f"--feature-dim must be an even number of at least 2, got {args.feature_dim}.")
    if args.window is not None and args.window < 1:
        raise SystemExit(f"--window must be at least 1, got {args.window}.")
    if args.sink < 0 or (args.sink and args.window is None):
        raise SystemExit(f"--sink must be 0 or more and goes with --window, got --sink {args.sink} --window {args.window}.")
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
        if not isinstance(spec, (Lightning, Hybrid)) and (replace is None or spec.kind in replace)]
    if not candidates:
        raise SystemExit(f"no head of plan {args.plan!r} may be converted (--replace {args.replace!r}).")
    settings = {"fingerprint": info.fingerprint, "length": args.length, "samples": args.samples,
                "held_out": args.held_out, "steps": args.steps, "lr": args.lr, "feature_dim": args.feature_dim,
                "seed": args.seed, "data": "pydoc_data.topics, consecutive slices from its start"}
    if args.window is not None:                   # lightning settings stay as before, so their stores still match
        settings.update(window=args.window, sink=args.sink)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    work = Path(args.work_dir) if args.work_dir else Path(args.out).with_suffix(".linearize")
    store = HeadStore(work / key, settings)
    todo = [lh for lh in candidates if not store.has(*lh)]
    print(f"linearize: {len(candidates)} candidate heads, {len(candidates) - len(todo)} already fitted in {store.root}")
    if todo:
        from ..eval.prose import corpus_text

        need = (args.samples + args.held_out) * args.length
        ids = tokenizer(corpus_text()[: need * 8], return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] < need:
            raise SystemExit(f"the calibration prose has {ids.shape[1]} tokens, fewer than the {need} asked for.")
        captures = []
        for i in tqdm(range(args.samples + args.held_out), desc="capture q/k/v", unit="sample"):
            captures.append(capture_qkv(model, ids[:, i * args.length:(i + 1) * args.length]))
        scale = getattr(model.config, "head_dim", info.head_dim) ** -0.5
        bar = tqdm(todo, desc="fit heads", unit="head")
        for layer, head in bar:
            def of(capture):
                q, k, v = capture[layer]
                return q[head * G:(head + 1) * G], k[head], v[head]
            t0 = time.perf_counter()
            fitted = fit_head([of(c) for c in captures[:args.samples]], [of(c) for c in captures[args.samples:]],
                              scale, feature_dim=args.feature_dim, steps=args.steps, lr=args.lr, seed=args.seed,
                              window=args.window, sink=args.sink)
            store.put(layer, head, fitted, time.perf_counter() - t0)
            bar.set_postfix(head=head_name(layer, head), error=f"{fitted.error:.3f}")
    fitted = {lh: store.get(*lh) for lh in candidates}
    errors = {lh: f.error for lh, f in fitted.items()}
    total = info.num_layers * info.num_kv_heads
    fraction = args.fraction if args.fraction is not None else (0.25 if listed is None else None)
    chosen = choose_heads(errors, fraction, args.max_error, total)
    calibration = {
        "method": "linearize", "base": {"plan": str(args.plan), **base.calibration},
        "linearize": {**settings, "fraction": fraction, "max_error": args.max_error, "replace": args.replace,
                      "converted": len(chosen),
                      "heads": [head_name(*lh) for lh in chosen],
                      "errors": {head_name(*lh): round(e, 5) for lh, e in sorted(errors.items())},
                      "fit_seconds": round(store.seconds(candidates), 1),
                      "command": getattr(args, "command_line", None)},
        "seconds": round(time.perf_counter() - started, 1)}
    plan = convert(base, fitted, chosen, calibration, args.window, args.sink)
    plan.save(args.out)
    worst = max((errors[lh] for lh in chosen), default=float("nan"))
    kind = "lightning" if args.window is None else f"hybrid (sink {args.sink}, window {args.window})"
    print(f"linearize: converted {len(chosen)} of {total} KV heads to {kind} (held-out error <= {worst:.3f}); wrote {args.out} "
          f"and {Path(args.out).with_suffix('.safetensors').name}")
    return 0
