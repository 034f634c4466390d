"""``headwise plan show PLAN``: density per length and a heatmap PNG of any plan; ``headwise plan list``:
the plans shipped with the package."""

from __future__ import annotations

from pathlib import Path

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="inspect plans")
    sub = p.add_subparsers(dest="plan_command", required=True)
    show = sub.add_parser("show", help="print density per length and draw the heatmap")
    show.add_argument("plan", help="plan JSON file or shipped plan name (headwise plan list)")
    show.add_argument("--lengths", default=None,
                      help="comma-separated lengths (default: the plan's calibration lengths and 1k..8k, doubling up "
                           "to the model's context)")
    show.add_argument("--png", default=None,
                      help="heatmap path (default: the plan's path with .png; for a shipped plan, <name>.png here)")
    show.add_argument("--kv-bytes", type=int, default=2,
                      help="bytes per cached K/V value in the memory table (2: bf16/fp16, 4: fp32)")
    show.set_defaults(func=show_plan)
    listing = sub.add_parser("list", help="the plans shipped with the package, by name")
    listing.set_defaults(func=list_plans)


def list_plans(args) -> int:
    from .plans import shipped

    rows = [("name", "short", "model", "density", "prefill", "heads by kind")]
    for p in shipped():
        kinds = ", ".join(f"{n} {k}" for k, n in p.kinds.items())
        rows.append((p.name, p.short, p.model, str(p.density), p.prefill, kinds))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print("Use a full or short name wherever a plan is taken (--plan d25, patch_model(model, 'd25')); "
          "a short name picks the plan made for the model in use.")
    return 0


def default_lengths(plan) -> list[int]:
    """1k, 2k, 4k, 8k, and further doublings up to the model's context (16k, 32k for a 32k model)."""
    lengths, n = list(DEFAULT_LENGTHS), DEFAULT_LENGTHS[-1] * 2
    while n <= plan.model.max_length:
        lengths.append(n)
        n *= 2
    return lengths


def show_plan(args) -> int:
    from .calibrate.heatmap import plan_heatmap
    from .cli import parse_lengths
    from .plan import load_plan

    from .plans import locate

    shipped = None if Path(args.plan).exists() else locate(args.plan)
    plan = load_plan(shipped or args.plan)
    if args.lengths:
        lengths = parse_lengths(args.lengths)
    else:
        lengths = sorted({*(int(n) for n in plan.calibration.get("lengths") or []), *default_lengths(plan)})
    cal = plan.calibration
    print(f"plan {args.plan}: model {plan.model.name}, {plan.model.num_layers} layers x {plan.model.num_kv_heads} "
          f"KV heads; method {cal.get('method', '?')}, made for density {cal.get('density', '?')}")
    heads = plan.heads
    print(f"  heads that keep every token: {sum(h.keeps_everything for h in heads)} of {len(heads)}; "
          f"distinct head configs: {len(set(heads))}")
    for kind in sorted({type(h) for h in heads}, key=lambda k: k.kind):
        summary = kind.plan_summary(plan)
        if summary:
            print(f"  {summary}")
    print("  length   density")
    for n in lengths:
        print(f"  {n:>6}   {plan.density(n):.4f}")
    print(memory_table(plan, lengths, args.kv_bytes))
    png = Path(args.png) if args.png else Path(shipped.name if shipped else args.plan).with_suffix(".png")
    if plan_heatmap(plan, png, lengths):
        print(f"  heatmap: {png}")
    return 0


def memory_table(plan, lengths: list[int], kv_bytes: int = 2) -> str:
    """Decode memory of one sequence per head kind and length: kept K/V (at ``kv_bytes`` per value)
    plus constant states (a lightning head's ``F x (D+1)`` fp32 state), MiB, over all layers."""
    D = plan.model.head_dim
    kinds: dict[str, list] = {}
    for head in plan.heads:
        kinds.setdefault(head.kind, []).append(head)
    dense_total = {n: 2 * n * D * kv_bytes * len(plan.heads) for n in lengths}
    lines = [f"  memory per sequence, MiB (K/V at {kv_bytes} bytes per value; dense model for comparison)",
             "  kind        heads" + "".join(f"  {n:>9}" for n in lengths)]
    totals = {n: 0 for n in lengths}
    for kind, heads in sorted(kinds.items()):
        row = f"  {kind:<10} {len(heads):>6}"
        for n in lengths:
            used = sum(h.memory_bytes(n, D, kv_bytes) for h in heads)
            totals[n] += used
            row += f"  {used / 2**20:>9.2f}"
        constant = sum(h.state_bytes(D, 1) for h in heads)
        lines.append(row + (f"   (of which {constant / 2**20:.2f} constant state)" if constant else ""))
    lines.append("  total      " + f"{len(plan.heads):>6}" + "".join(f"  {totals[n] / 2**20:>9.2f}" for n in lengths))
    lines.append("  all-dense  " + f"{len(plan.heads):>6}" + "".join(f"  {dense_total[n] / 2**20:>9.2f}" for n in lengths))
    return "\n".join(lines)
