"""``headwise calibrate``: profile a model on long prose and solve for a plan at a density.

Example::

    headwise calibrate --density 0.25 --lengths 1024,2048,4096 --out plan.json

Profiles are cached (``--cache-dir``) and resumable; a second run at another density with the
same model, data and lengths only re-solves the MILP.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from ..cli import add_threads, parse_lengths
from .checkpointing import GATES_CHECKPOINT_ABOVE, POLICIES, PROFILE_CHECKPOINT_ABOVE, CheckpointPolicy
from .kinds import SPAN_FLOORS

MIN_LENGTH = 256
SHORT_INPUT = 256     # plans keep their span floor from here on (tests/calibrate/test_short_inputs.py)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, GiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def torch_threads(threads: int | None) -> None:
    """Set torch's intra-op threads when given (on a busy shared machine fewer can be faster)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="profile a model and write a plan at a target density",
                              description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help="model name (headwise model list) or local checkpoint folder (default: the embedded SmolLM2)")
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
    p.add_argument("--min-span", type=int, default=96,
                   help="least window span every window head keeps (a span floor, so short inputs never fall "
                        "below sink + 96 tokens)")
    p.add_argument("--span-floor", choices=SPAN_FLOORS, default="clamp",
                   help="how --min-span holds: clamp (v3, default): every window's rule is "
                        "max(min_span, alpha + beta*N), so elastic heads keep their share at long N; candidate "
                        "(v1/v2): windows below --min-span at --guard-length tokens are left out")
    p.add_argument("--guard-length", type=int, default=SHORT_INPUT,
                   help=f"--span-floor candidate: input length --min-span is checked at (default {SHORT_INPUT}, "
                        "the shortest input a plan promises not to collapse on)")
    p.add_argument("--budget-lengths", default="auto",
                   help="lengths the density budget holds at: auto (default: 4 doublings ending at the model's "
                        "context, e.g. 1024,2048,4096,8192 for an 8k model), profiled (only --lengths), or a list; "
                        "the profiled lengths always count")
    p.add_argument("--budget-tolerance", default="0.01",
                   help="keep density*N of KV within this fraction at every budget length from --strict-from on "
                        "(default 0.01); none: at most density*N (v1/v2, which may spend less at long N)")
    p.add_argument("--strict-from", type=int, default=None,
                   help="shortest budget length the tolerance band holds at; below it the span floor may push "
                        "kept KV above density*N (default: the second budget length, 2048 for an 8k model)")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of every window head")
    p.add_argument("--alpha-step", type=int, default=None, help="alpha grid step (default: shortest length / 8)")
    p.add_argument("--refit", type=int, default=0,
                   help="rounds of re-profiling the same samples at the last plan and re-solving with every "
                        "profile pooled (0: MoA's single profile at the dense model)")
    p.add_argument("--method", choices=("profile", "gates", "retrieval"), default="profile",
                   help="profile: v1, every span from the first-order profile + MILP; gates: v2, long heads chosen "
                        "by trained DuoAttention-style gates (their joint effect) fixed dense, the others' spans "
                        "from the same MILP; retrieval: the same with the long heads ranked by their attention on "
                        "the recall samples' facts while the dense model recites them (no training; needs "
                        "--long-heads)")
    p.add_argument("--retrieval-score", choices=("entry", "copy"), default="entry",
                   help="--method retrieval: rank by attention on the whole recited entry (default) or on the "
                        "copied token alone")
    p.add_argument("--gate-lengths", default="1024,2048,4096",
                   help="v2: lengths of the gate-training samples (1024,2048 calibrates the d25 in about half the "
                        "time and changed 1 of its 16 long heads; see the README)")
    p.add_argument("--gate-samples", type=int, default=2, help="v2: gate-training samples per length")
    p.add_argument("--gate-steps", type=int, default=18, help="v2: Adam steps (one sample each)")
    p.add_argument("--gate-lr", type=float, default=0.05, help="v2: Adam learning rate of the gates")
    p.add_argument("--gate-l1", type=float, default=0.05, help="v2: weight of the mean gate (L1 penalty)")
    p.add_argument("--gate-window", type=int, default=256, help="v2: window span of the local branch while training")
    p.add_argument("--gate-facts", type=int, default=8, help="v2: facts per gate-training sample")
    p.add_argument("--gate-threshold", type=float, default=0.5, help="v2: heads whose gate ends above this are long")
    p.add_argument("--long-heads", type=int, default=None,
                   help="v2: make this many top-ranked heads long, at most what the budget allows (default: gates above "
                        "--gate-threshold)")
    p.add_argument("--elastic-heads", type=int, default=0,
                   help="v3 approach iii: the heads ranked next by the gates after the long ones (this many) keep "
                        "a long elastic span of at least --elastic-share of N instead of a short window")
    p.add_argument("--elastic-share", type=float, default=0.5,
                   help="least share of N each --elastic-heads head keeps at every budget length from --strict-from")
    p.add_argument("--windows", choices=("milp", "even"), default="milp",
                   help="how the heads that are not long share the rest of the budget: milp (default) sizes each "
                        "span from the gradient profile; even gives each the same elastic window (sink + a share "
                        "of N), DuoAttention's streaming heads, and needs no profile (needs --method gates or "
                        "retrieval)")
    p.add_argument("--select", default=None, metavar="L:E,...",
                   help="v3 approach ii: solve one plan per LONG:ELASTIC split of --long-heads / --elastic-heads "
                        "(e.g. 8:0,4:4,2:6) and keep the one with the lowest validation score: the excess NLL over "
                        "dense on held-out recall, summary and prose samples (needs --method gates)")
    p.add_argument("--validation-samples", type=int, default=4,
                   help="--select: held-out calibration samples (recall and summary alternating; half as many prose "
                        "passages are added)")
    p.add_argument("--validation-length", type=int, default=None,
                   help="--select: tokens per held-out sample (default: the held-out profile length)")
    p.add_argument("--gates-from", default=None, metavar="PLAN",
                   help="v2: take the gates recorded in this plan (made by --method gates for the same model) "
                        "instead of training them, e.g. to re-solve a shipped plan at other densities")
    p.add_argument("--prefill", choices=("sparse", "dense"), default=None,
                   help="the plan's prefill mode (default: none recorded, i.e. sparse)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per MILP solve")
    p.add_argument("--checkpoint", choices=POLICIES, default="auto",
                   help="gradient checkpointing of the profile and gate passes: auto (default) checkpoints "
                        f"profile samples above {PROFILE_CHECKPOINT_ABOVE} and gate samples above "
                        f"{GATES_CHECKPOINT_ABOVE} tokens, and any sample whose activations would not fit in "
                        "half the free memory (measured: faster below, more memory); the result is the same "
                        "either way")
    add_threads(p)
    p.add_argument("--seed", type=int, default=0, help="data sampling seed")
    p.add_argument("--cache-dir", default=None,
                   help="where profiles, gate samples and gates are kept (default: ~/.cache/headwise/calibration)")
    p.add_argument("--out", required=True, help="plan JSON to write; the heatmap goes beside it (.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.calibration import data_description
    from ..extras import require
    from ..models import load_model
    from .optimize import candidate_grid, guard_length, optimize
    from .profile import ProfileStore, pooled

    if not 0.0 < args.density <= 1.0:
        raise SystemExit(f"--density must be in (0, 1], got {args.density}.")
    require("scipy.optimize", "headwise calibrate")            # before any profiling, not after it
    lengths = parse_lengths(args.lengths, MIN_LENGTH)
    holdout = args.holdout if args.holdout is not None else (lengths[-1] if len(lengths) > 1 else None)
    if holdout is not None and holdout not in lengths:
        lengths = sorted({*lengths, holdout})
    started = time.perf_counter()
    torch_threads(args.threads)
    if args.windows == "even":
        return run_even(args, lengths, started)
    model, tokenizer = load_model(args.model)
    store = ProfileStore(model, args.cache_dir, answer_tokens=args.answer_tokens, seed=args.seed,
                         checkpoint=CheckpointPolicy.named(args.checkpoint, PROFILE_CHECKPOINT_ABOVE))
    todo = store.missing(lengths, args.samples)
    print(f"headwise calibrate: profiles in {store.directory} ({len(todo)} of {len(lengths) * args.samples} "
          "samples to compute)", flush=True)
    profiles = store.collect(model, tokenizer, lengths, args.samples)
    profiled = time.perf_counter() - started
    budgeted, tolerance, strict_from = budget_settings(args, lengths, store.info.max_length)
    candidates = candidate_grid(budgeted, args.sink, args.alpha_step, args.min_span, args.guard_length,
                                floor=args.span_floor)
    long_heads, elastic_heads, v2 = None, None, {}
    splits = parse_splits(args.select) if args.select else None
    check_ranking_args(args, splits)
    if args.method != "profile":
        strict = [n for n in budgeted if n >= strict_from] if tolerance is not None else lengths
        long_heads, elastic_heads, v2 = choose_long_heads(model, tokenizer, store.info, candidates, args, strict)
    print(f"headwise calibrate: solving the MILP at density {args.density} "
          f"(fit {[n for n in lengths if n != holdout]}, held-out {holdout})", flush=True)
    solve_start = time.perf_counter()     # includes refit rounds
    command = args.command_line
    calibration = {"data": {**data_description(), "samples_per_length": args.samples,
                            "answer_tokens": args.answer_tokens, "seed": args.seed},
                   "mean_answer_loss": {str(n): p.loss for n, p in profiles.items()},
                   "profile_seconds_when_computed": round(sum(p.seconds for p in profiles.values()), 1),
                   "command": command}
    candidate_notes = {"min_span": args.min_span, "span_floor": args.span_floor, "sink": args.sink,
                       **({"min_span_at": guard_length(lengths, args.guard_length)}
                          if args.span_floor == "candidate" else {})}
    points = [profiles]

    def solve():
        mass = profiles if len(points) == 1 else {n: pooled([p[n] for p in points]) for n in lengths}
        return optimize(mass, store.info, args.density, candidates, holdout=holdout, max_configs=args.max_configs,
                        time_limit=args.time_limit, score=args.score, calibration={**candidate_notes, **calibration, **v2},
                        long_heads=long_heads, uniform_sink=args.sink, budget_at=budgeted, tolerance=tolerance,
                        strict_from=strict_from, elastic_heads=elastic_heads, elastic_share=args.elastic_share)

    if splits:
        def solve_split(long_count: int, elastic_count: int):
            nonlocal long_heads, elastic_heads, v2
            split_args = argparse.Namespace(**{**vars(args), "long_heads": long_count, "elastic_heads": elastic_count})
            long_heads, elastic_heads, v2 = choose_long_heads(model, tokenizer, store.info, candidates, split_args,
                                                              strict)
            result = solve()
            if args.prefill is not None:
                result.plan = dataclasses.replace(result.plan, prefill=args.prefill)
            return result

        validation_length = args.validation_length or holdout or lengths[-1]
        result = select_split(model, tokenizer, splits, solve_split, validation_length, args)
    else:
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
    if args.prefill is not None:
        result.plan = dataclasses.replace(result.plan, prefill=args.prefill)
    result.plan.calibration["solve_seconds"] = round(time.perf_counter() - solve_start, 1)
    result.plan.calibration["seconds_this_run_profiling"] = round(profiled, 1)
    return write_plan(result.plan, args, lengths, budgeted, started)


def write_plan(plan, args, lengths: list[int], budgeted: list[int], started: float) -> int:
    """Record time and memory in ``plan.calibration``, write it to ``--out`` with its heatmap beside
    it, and print the density (and normalised loss, where profiled) at every budget length."""
    from .heatmap import plan_heatmap

    plan.calibration["seconds"] = round(time.perf_counter() - started, 1)
    plan.calibration["peak_rss_gib"] = round(peak_rss_gib(), 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    png = out.with_suffix(".png")
    drawn = plan_heatmap(plan, png, lengths)
    print(f"headwise calibrate: wrote {out}{f' and {png}' if drawn else ''} in {plan.calibration['seconds']:.0f} s "
          f"(peak memory {plan.calibration['peak_rss_gib']:.2f} GiB)")
    losses = plan.calibration.get("normalized_loss")
    for n in budgeted:
        loss = (losses or {}).get(str(n))
        print(f"  N={n:>6}: density {plan.density(n):.4f}" + ("" if losses is None else
              f"  normalized loss {loss:.4f}" if loss is not None else "  (budget only, not profiled)"))
    return 0


def run_even(args, lengths: list[int], started: float) -> int:
    """``--windows even``: rank the heads, make the top ones dense and give every other head the same
    elastic window (``even.even_windows``); no profile is computed."""
    from ..models import load_model
    from ..plan import ModelInfo
    from .even import even_windows
    from .optimize import candidate_grid

    if args.method == "profile":
        raise SystemExit("--windows even keeps the heads ranked by the gates or retrieval scores dense; add "
                         "--method gates or --method retrieval.")
    if args.select or args.refit:
        raise SystemExit("--select and --refit score plans on the profile; --windows even computes none, drop them.")
    check_ranking_args(args, None)
    model, tokenizer = load_model(args.model)
    info = ModelInfo.of(model)
    budgeted, tolerance, strict_from = budget_settings(args, lengths, info.max_length)
    candidates = candidate_grid(budgeted, args.sink, args.alpha_step, args.min_span, args.guard_length,
                                floor=args.span_floor)
    strict = [n for n in budgeted if n >= strict_from] if tolerance is not None else budgeted
    long_heads, elastic_heads, notes = choose_long_heads(model, tokenizer, info, candidates, args, strict)
    plan = even_windows(info, args.density, long_heads, sink=args.sink, min_span=args.min_span, budget_at=budgeted,
                        tolerance=tolerance, strict_from=strict_from, elastic_heads=elastic_heads,
                        elastic_share=args.elastic_share,
                        calibration={"method": f"{args.method}+even", "windows": "even",
                                     "command": args.command_line, "min_span": args.min_span, "sink": args.sink,
                                     **notes})
    if args.prefill is not None:
        plan = dataclasses.replace(plan, prefill=args.prefill)
    print(f"headwise calibrate: --windows even: every other head keeps {plan.calibration['window_share']:.4f} of N",
          flush=True)
    return write_plan(plan, args, lengths, budgeted, started)


def check_ranking_args(args, splits: list[tuple[int, int]] | None) -> None:
    """Refuse, in one sentence each, long-head options that the method or each other rule out."""
    if args.elastic_heads and args.method == "profile":
        raise SystemExit("--elastic-heads takes the heads ranked by the gates or retrieval scores; add --method gates "
                         "or --method retrieval.")
    if not 0.0 < args.elastic_share <= 1.0:
        raise SystemExit(f"--elastic-share must be in (0, 1], got {args.elastic_share}.")
    if splits and args.method == "profile":
        raise SystemExit("--select splits the heads ranked by the gates or retrieval scores; add --method gates or "
                         "--method retrieval.")
    if args.method == "retrieval" and args.long_heads is None and not splits:
        raise SystemExit("--method retrieval needs --long-heads N: how many of its top-ranked heads stay dense.")


def parse_splits(text: str) -> list[tuple[int, int]]:
    """``"8:0,4:4"`` -> ``[(8, 0), (4, 4)]`` (long heads, elastic heads); one sentence when malformed."""
    splits = []
    for part in text.split(","):
        try:
            long_count, elastic_count = (int(x) for x in part.split(":"))
        except ValueError:
            raise SystemExit(f"--select takes LONG:ELASTIC pairs separated by commas, e.g. 8:0,4:4; got {part!r}.") \
                from None
        if long_count < 0 or elastic_count < 0:
            raise SystemExit(f"--select counts must be >= 0, got {part!r}.")
        splits.append((long_count, elastic_count))
    return splits


def select_split(model, tokenizer, splits, solve_split, length: int, args):
    """Approach ii: the solved plan of each ``(long, elastic)`` split, scored on one validation split;
    returns the lowest-scoring split's ``OptimizeResult`` with the table in its ``calibration``."""
    from ..errors import CalibrationError
    from .validate import build_validation, validation_score

    print(f"headwise calibrate: --select: building {args.validation_samples} held-out samples of {length} tokens "
          f"(+{max(1, args.validation_samples // 2)} prose)", flush=True)
    validation = build_validation(model, tokenizer, length, args.validation_samples, seed=args.seed,
                                  answer_tokens=args.answer_tokens)
    rows, best = [], None
    for long_count, elastic_count in splits:
        started = time.perf_counter()
        try:
            result = solve_split(long_count, elastic_count)
        except CalibrationError as error:
            rows.append({"long": long_count, "elastic": elastic_count, "feasible": False, "reason": str(error)})
            print(f"  {long_count}:{elastic_count}: no plan ({error})", flush=True)
            continue
        score = validation_score(model, result.plan, validation)
        notes = result.plan.calibration["long_heads"]
        rows.append({"long": notes["count"], "elastic": elastic_count, "feasible": True,
                     **{k: round(v, 5) for k, v in score.items()}, "seconds": round(time.perf_counter() - started, 1)})
        print(f"  {long_count}:{elastic_count}: score {score['score']:.4f} ("
              + ", ".join(f"{k} {score[k]:+.4f}" for k in ("recall", "summary", "prose") if k in score)
              + f") {rows[-1]['seconds']:.0f} s", flush=True)
        if best is None or score["score"] < best[0]:
            best = (score["score"], len(rows) - 1, result)
    if best is None:
        raise SystemExit("--select: no split gave a plan that fits the budget; try fewer long or elastic heads.")
    _, index, result = best
    result.plan.calibration["selection"] = {"method": "approach ii: lowest validation score over --select splits",
                                            "validation": validation.describe(), "rows": rows, "chosen": index,
                                            "validation_seconds": round(validation.seconds, 1)}
    chosen = rows[index]
    print(f"headwise calibrate: --select chose {chosen['long']}:{chosen['elastic']} "
          f"(score {chosen['score']:.4f}; validation set built in {validation.seconds:.0f} s)", flush=True)
    return result


def budget_settings(args, lengths: list[int], context: int) -> tuple[list[int], float | None, int]:
    """``(budget lengths, tolerance or None, strict_from)`` from ``--budget-lengths``,
    ``--budget-tolerance`` and ``--strict-from``; budget lengths always include the profiled ones."""
    from .optimize import budget_lengths

    if args.budget_lengths == "auto":
        if context <= 0:
            raise SystemExit("the model's config gives no context length (max_position_embeddings); "
                             "give --budget-lengths as a list, or profiled.")
        extra = budget_lengths(context, MIN_LENGTH)
    elif args.budget_lengths == "profiled":
        extra = []
    else:
        extra = parse_lengths(args.budget_lengths, MIN_LENGTH)
    budgeted = sorted({*lengths, *extra})
    if context > 0 and budgeted[-1] > context:
        raise SystemExit(f"budget length {budgeted[-1]} is beyond the model's context of {context} tokens; "
                         "give --budget-lengths up to it.")
    if args.budget_tolerance == "none":
        tolerance = None
    else:
        try:
            tolerance = float(args.budget_tolerance)
        except ValueError:
            raise SystemExit(f"--budget-tolerance must be a fraction such as 0.01 or none, got {args.budget_tolerance!r}.")
        if not 0.0 <= tolerance < 1.0:
            raise SystemExit(f"--budget-tolerance must be in [0, 1), got {tolerance}.")
    strict_from = args.strict_from if args.strict_from is not None else (
        budgeted[1] if len(budgeted) > 1 else budgeted[0])
    return budgeted, tolerance, strict_from


def choose_long_heads(model, tokenizer, info, candidates, args, budget_lengths: list[int]):
    """Calibrator v2/v3: rank the KV heads (trained gates, or retrieval scores with ``--method
    retrieval``) and pick the long ones.

    Returns ``(long [layers, Hkv] bool, elastic [layers, Hkv] bool or None, calibration notes)``:
    long heads are the top ``--long-heads`` of the ranking (gates: by default those whose gate ends
    above ``--gate-threshold``), capped so every other head can still keep its least candidate's
    share of the context under ``--density`` at ``budget_lengths``; elastic heads (v3 approach iii)
    the next ``--elastic-heads`` of the ranking.
    """
    from .optimize import long_head_cap
    from .select import head_mask

    ranking, default_count, notes = (retrieval_ranking if args.method == "retrieval" else gate_ranking)(
        model, tokenizer, info, args)
    heads = info.num_layers * info.num_kv_heads
    cap = long_head_cap(budget_lengths, args.density, heads, candidates)
    wanted = args.long_heads if args.long_heads is not None else default_count
    if not 0 <= wanted <= heads:
        raise SystemExit(f"--long-heads must be between 0 and the model's {heads} KV heads, got {wanted}.")
    count = min(wanted, cap)
    long = head_mask(ranking[:count], (info.num_layers, info.num_kv_heads))
    if not 0 <= args.elastic_heads <= heads - count:
        raise SystemExit(f"--elastic-heads must be between 0 and the {heads - count} heads that are not long, "
                         f"got {args.elastic_heads}.")
    next_ranked = ranking[count:count + args.elastic_heads]
    elastic = head_mask(next_ranked, (info.num_layers, info.num_kv_heads)) if next_ranked else None
    notes = {"long_heads": {**notes, "count": count, "wanted": wanted, "cap": cap,
                            "heads": [[l, h] for l, h in ranking[:count]]},
             **({"elastic_heads": {"count": len(next_ranked), "share": args.elastic_share,
                                   "heads": [[l, h] for l, h in next_ranked]}} if next_ranked else {})}
    asked = (f"--long-heads {wanted}" if args.long_heads is not None
             else f"gates above {args.gate_threshold}: {wanted}")
    print(f"headwise calibrate: {count} long heads ({asked}, budget cap {cap})"
          + (f", the next {len(next_ranked)} elastic (>= {args.elastic_share:g} of N)" if next_ranked else ""),
          flush=True)
    return long, elastic, notes


def gate_ranking(model, tokenizer, info, args):
    """``(ranking, heads whose gate ends above --gate-threshold, notes)`` from trained (or cached, or
    ``--gates-from``) DuoAttention-style gates."""
    from ..data.recall import recall_description
    from .gates import GateSettings, GateStore

    gate_lengths = parse_lengths(args.gate_lengths, MIN_LENGTH)
    settings = GateSettings(tuple(gate_lengths), args.gate_samples, args.gate_steps, args.gate_lr, args.gate_l1,
                            args.sink, args.gate_window, args.seed)
    started = time.perf_counter()
    if args.gates_from:
        result, settings = gates_of_plan(args.gates_from, info)
        print(f"headwise calibrate: gates taken from {args.gates_from}", flush=True)
    else:
        store = GateStore(model, args.cache_dir, facts=args.gate_facts, seed=args.seed,
                          checkpoint=CheckpointPolicy.named(args.checkpoint, GATES_CHECKPOINT_ABOVE))
        result, computed = store.gates(model, tokenizer, settings)
        print(f"headwise calibrate: gates {'trained' if computed else 'loaded'} from {store.gates_path(settings)} "
              f"({time.perf_counter() - started:.0f} s this run)", flush=True)
    notes = {"method": "duoattention-style gates",
             "gates": np.round(result.gates, 4).tolist(),
             "importance": np.round(result.importance, 8).tolist(),
             "settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings,
             "facts": args.gate_facts, **({"gates_from": args.gates_from} if args.gates_from else {}),
             "threshold": args.gate_threshold,
             "final_distill": result.history[-1]["distill"] if result.history else None,
             "seconds_when_trained": round(result.seconds, 1),
             "data": recall_description(args.gate_facts)}
    return result.ranking(), int((result.gates > args.gate_threshold).sum()), notes


def retrieval_ranking(model, tokenizer, info, args):
    """``(ranking, None, notes)`` from retrieval scores on the recall samples (``--gate-lengths``,
    ``--gate-samples``, ``--gate-facts``; computed once, then kept in the cache)."""
    from ..data.recall import recall_description
    from .retrieval import RetrievalSettings, RetrievalStore

    if args.gates_from:
        raise SystemExit("--gates-from takes recorded gates; --method retrieval ranks by retrieval scores, drop one.")
    settings = RetrievalSettings(tuple(parse_lengths(args.gate_lengths, MIN_LENGTH)), args.gate_samples,
                                 args.gate_facts, args.seed)
    store = RetrievalStore(model, args.cache_dir, facts=args.gate_facts, seed=args.seed)
    started = time.perf_counter()
    result, computed = store.scores(model, tokenizer, settings)
    print(f"headwise calibrate: retrieval scores {'computed' if computed else 'loaded'} from {store.path(settings)} "
          f"({time.perf_counter() - started:.0f} s this run)", flush=True)
    notes = {"method": f"retrieval heads ({args.retrieval_score} attention on the recited facts)",
             "score": args.retrieval_score,
             "entry_mass": np.round(result.entry_mass, 4).tolist(),
             "copy_mass": np.round(result.copy_mass, 4).tolist(),
             "top1": np.round(result.top1, 4).tolist(),
             "positions": result.positions,
             "settings": dataclasses.asdict(settings),
             "seconds_when_computed": round(result.seconds, 1),
             "data": recall_description(args.gate_facts)}
    return result.ranking(args.retrieval_score), None, notes


def gates_of_plan(path: str, info):
    """``(GateResult, gate settings as recorded)`` from a plan made by ``--method gates``; one sentence
    when the plan has no gates or was made for another architecture."""
    from ..plan import PlanError, load_plan
    from .gates import GateResult

    plan = load_plan(path)
    if plan.model.fingerprint != info.fingerprint:
        raise SystemExit(f"--gates-from {path} was made for another model ({plan.model.name}); use a plan of this model.")
    notes = plan.calibration.get("long_heads") or {}
    if "gates" not in notes or "importance" not in notes:
        raise SystemExit(f"--gates-from {path} records no gates (it was not made with --method gates); "
                         "give a gates plan or train the gates.")
    gates, importance = np.asarray(notes["gates"], dtype=np.float64), np.asarray(notes["importance"], dtype=np.float64)
    if gates.shape != (info.num_layers, info.num_kv_heads) or importance.shape != gates.shape:
        raise PlanError(f"--gates-from {path}: gates of shape {gates.shape}, expected "
                        f"{(info.num_layers, info.num_kv_heads)}.")
    return GateResult(gates, importance, seconds=float(notes.get("seconds_when_trained", 0.0))), notes.get("settings")
