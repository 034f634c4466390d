"""``headwise calibrate``: profile a model on long prose and solve for a plan at a density.

Example::

    headwise calibrate --density 0.25 --lengths 1024,2048,4096 --out plan.json

Profiles are cached (``--cache-dir``) and resumable; a second run at another density with the
same model, data and lengths only re-solves the MILP.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..cli import parse_lengths

MIN_LENGTH = 256


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="profile a model and write a plan at a target density",
                              description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint folder (default: embedded SmolLM2)")
    p.add_argument("--density", type=float, required=True, help="kept fraction of the KV cache, e.g. 0.25")
    p.add_argument("--lengths", default="1024,2048,4096", help="profiled lengths in tokens (add 8192 for 8k)")
    p.add_argument("--holdout", type=int, default=None,
                   help="length that picks among Pareto plans (default: the longest of --lengths)")
    p.add_argument("--samples", type=int, default=4,
                   help="calibration samples per length (even: recall, odd: summary)")
    p.add_argument("--answer-tokens", type=int, default=32, help="greedy answer tokens per sample (loss targets)")
    p.add_argument("--max-configs", type=int, default=2, help="distinct head configs allowed per layer")
    p.add_argument("--score", choices=("abs", "tile"), default="tile",
                   help="tile mass a span drops: tile = |sum of E| per tile and sample (default), abs = sum of |E| (MoA)")
    p.add_argument("--min-span", type=int, default=64,
                   help="least window span a head may have at half the shortest length (guards short inputs)")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of every window head")
    p.add_argument("--alpha-step", type=int, default=None, help="alpha grid step (default: shortest length / 8)")
    p.add_argument("--refit", type=int, default=0,
                   help="rounds of re-profiling the same samples at the last plan and re-solving with every "
                        "profile pooled (0: MoA's single profile at the dense model)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per MILP solve")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="data sampling seed")
    p.add_argument("--cache-dir", default=None, help="profile cache folder (default: ~/.cache/headwise/profiles)")
    p.add_argument("--out", required=True, help="plan JSON to write; the heatmap goes beside it (.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..models import load_model
    from .data import data_description
    from .heatmap import plan_heatmap
    from .optimize import optimize
    from .store import ProfileStore, pooled, torch_threads

    if not 0.0 < args.density <= 1.0:
        raise SystemExit(f"--density must be in (0, 1], got {args.density}.")
    lengths = parse_lengths(args.lengths, MIN_LENGTH)
    holdout = args.holdout if args.holdout is not None else (lengths[-1] if len(lengths) > 1 else None)
    if holdout is not None and holdout not in lengths:
        lengths = sorted({*lengths, holdout})
    started = time.perf_counter()
    torch_threads(args.threads)
    model, tokenizer = load_model(args.model)
    store = ProfileStore(model, args.cache_dir, answer_tokens=args.answer_tokens, seed=args.seed)
    todo = store.missing(lengths, args.samples)
    print(f"headwise calibrate: profiles in {store.directory} ({len(todo)} of {len(lengths) * args.samples} "
          "samples to compute)", flush=True)
    profiles = store.collect(model, tokenizer, lengths, args.samples)
    profiled = time.perf_counter() - started
    print(f"headwise calibrate: solving the MILP at density {args.density} "
          f"(fit {[n for n in lengths if n != holdout]}, held-out {holdout})", flush=True)
    solve_start = time.perf_counter()     # includes refit rounds
    command = args.command_line
    calibration = {"data": {**data_description(), "samples_per_length": args.samples,
                            "answer_tokens": args.answer_tokens, "seed": args.seed},
                   "mean_answer_loss": {str(n): p.loss for n, p in profiles.items()},
                   "profile_seconds_when_computed": round(sum(p.seconds for p in profiles.values()), 1),
                   "command": command}
    points = [profiles]

    def solve():
        mass = profiles if len(points) == 1 else {n: pooled([p[n] for p in points]) for n in lengths}
        return optimize(mass, store.info, args.density, holdout=holdout, max_configs=args.max_configs,
                        sink=args.sink, alpha_step=args.alpha_step, time_limit=args.time_limit, score=args.score,
                        min_span=args.min_span, calibration=calibration)

    result = solve()
    refits = []
    for round_ in range(args.refit):
        todo = store.missing(lengths, args.samples, result.plan)
        print(f"headwise calibrate: refit {round_ + 1}/{args.refit}: profiling the samples at the plan "
              f"({len(todo)} to compute)", flush=True)
        at_plan = store.collect_at(model, result.plan, lengths, args.samples)
        points.append(at_plan)
        refits.append({"mean_answer_loss_at_plan": {str(n): p.loss for n, p in at_plan.items()},
                       "profile_seconds_when_computed": round(sum(p.seconds for p in at_plan.values()), 1)})
        result = solve()
    if refits:
        result.plan.calibration["refits"] = refits
    result.plan.calibration["solve_seconds"] = round(time.perf_counter() - solve_start, 1)
    result.plan.calibration["seconds"] = round(time.perf_counter() - started, 1)
    result.plan.calibration["seconds_this_run_profiling"] = round(profiled, 1)
    result.plan.calibration["peak_rss_gib"] = round(peak_rss_gib(), 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.plan.save(out)
    png = out.with_suffix(".png")
    plan_heatmap(result.plan, png, lengths)
    print(f"headwise calibrate: wrote {out} and {png} in {result.plan.calibration['seconds']:.0f} s "
          f"(peak memory {result.plan.calibration['peak_rss_gib']:.2f} GiB)")
    for n in lengths:
        print(f"  N={n:>6}: density {result.plan.density(n):.4f}  normalized loss "
              f"{result.plan.calibration['normalized_loss'][str(n)]:.4f}")
    return 0
