"""``headwise plan show plan.json``: density per length and a heatmap PNG of any plan."""

from __future__ import annotations

from pathlib import Path

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="inspect plans")
    sub = p.add_subparsers(dest="plan_command", required=True)
    show = sub.add_parser("show", help="print density per length and draw the heatmap")
    show.add_argument("plan", help="plan JSON file")
    show.add_argument("--lengths", default=None,
                      help="comma-separated lengths (default: the plan's calibration lengths, else 1k..8k)")
    show.add_argument("--png", default=None, help="heatmap path (default: the plan's path with .png)")
    show.set_defaults(func=show_plan)


def show_plan(args) -> int:
    from .calibrate.heatmap import plan_heatmap
    from .cli import parse_lengths
    from .plan import Dense, load_plan

    plan = load_plan(args.plan)
    if args.lengths:
        lengths = parse_lengths(args.lengths)
    else:
        lengths = sorted({*(int(n) for n in plan.calibration.get("lengths") or []), *DEFAULT_LENGTHS})
    cal = plan.calibration
    print(f"plan {args.plan}: model {plan.model.name}, {plan.model.num_layers} layers x {plan.model.num_kv_heads} "
          f"KV heads; method {cal.get('method', '?')}, made for density {cal.get('density', '?')}")
    heads = plan.heads
    print(f"  dense heads: {sum(isinstance(h, Dense) for h in heads)} of {len(heads)}; "
          f"distinct head configs: {len(set(heads))}")
    print("  length   density")
    for n in lengths:
        print(f"  {n:>6}   {plan.density(n):.4f}")
    png = Path(args.png) if args.png else Path(args.plan).with_suffix(".png")
    plan_heatmap(plan, png, lengths)
    print(f"  heatmap: {png}")
    return 0
