"""``headwise eval``: dense vs uniform 25% vs your plans on the long-context tasks, via lm-eval.

The default is a reduced preset sized for about half an hour on 2 idle CPU cores (one sample
per task and length); ``--full`` runs the full count, ``--trials`` any count.
``--write-tasks DIR`` only writes the lm-eval tasks, for ``python -m headwise.eval run``.
"""

from __future__ import annotations

ALL_KINDS = ["passkey", "niah", "kv", "vt", "perplexity"]
# Samples per task and length. Reduced: fits ~30 min on 2 cores for 3 plans x 2k/4k/8k (measured, see README).
REDUCED_TRIALS = {"passkey": 1, "niah": 1, "kv": 1, "vt": 1, "perplexity": 1}
FULL_TRIALS = {"passkey": 10, "niah": 10, "kv": 10, "vt": 10, "perplexity": 5}


def _parse_list(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x.strip()]


def _trials(args, kinds: list[str]) -> dict[str, int]:
    if args.trials is not None:
        return {k: args.trials for k in kinds}
    return {k: (FULL_TRIALS if args.full else REDUCED_TRIALS)[k] for k in kinds}


def run_eval(args) -> int:
    import logging

    kinds = _parse_list(args.tasks)
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown:
        raise SystemExit(f"headwise eval: unknown task(s) {unknown}; choose from {ALL_KINDS}.")
    lengths = _parse_list(args.lengths, int)
    trials = _trials(args, kinds)
    if args.write_tasks:
        from ..models import load_model
        from .taskfiles import write_tasks

        _, tokenizer = load_model(args.model)
        names = write_tasks(tokenizer, args.write_tasks, kinds, lengths, trials, seed=args.seed)
        print(f"wrote {len(names)} lm-eval tasks (tag headwise_long) to {args.write_tasks}: {' '.join(names)}")
        return 0

    from .runner import compare_plans, plan_label

    logging.getLogger("headwise").setLevel(logging.INFO if args.verbose else logging.WARNING)
    specs = ([] if args.no_baselines else ["dense", "uniform:0.25"]) + list(args.plan)
    if not specs:
        raise SystemExit("headwise eval: nothing to compare; give --plan or drop --no-baselines.")
    plans = {plan_label(s): s for s in specs}
    print(f"headwise eval: plans {list(plans)}, tasks {trials}, lengths {lengths}", flush=True)
    out, table = compare_plans(plans, kinds, lengths, trials, args.out, pretrained=args.model,
                               batch_size=args.batch_size, seed=args.seed, kernels=args.backend)
    print()
    print(table)
    print(f"\nreport: {out}/results.md, results.json, results.png, config.json")
    return 0


def register(subparsers) -> None:
    from ..cli import add_threads

    p = subparsers.add_parser("eval", help="long-context tasks via lm-eval: dense vs uniform 25%% vs plans")
    p.add_argument("--plan", action="append", default=[],
                   help="plan to compare too: JSON path, 'dense' or 'uniform:<density>' (repeatable)")
    p.add_argument("--no-baselines", action="store_true", help="skip the dense and uniform 25%% baselines")
    p.add_argument("--tasks", default=",".join(ALL_KINDS), help="task kinds, comma separated")
    p.add_argument("--lengths", default="2048,4096,8192", help="context lengths in tokens, comma separated")
    p.add_argument("--trials", type=int, default=None, help="samples per task and length (overrides the preset)")
    p.add_argument("--full", action="store_true", help=f"full sample counts {FULL_TRIALS} instead of {REDUCED_TRIALS}")
    p.add_argument("--model", default=None,
                   help="model name (headwise model list) or local checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--backend", default="auto", help="attention kernel backend: auto, cpu, naive, native, triton")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated task samples")
    add_threads(p)
    p.add_argument("--out", default="results", help="parent folder of the run's output directory")
    p.add_argument("--write-tasks", metavar="DIR", default=None,
                   help="only write the lm-eval task YAMLs + data to DIR (for python -m headwise.eval run)")
    p.set_defaults(func=run_eval)
