"""Quality against KV kept: calibrated plans vs uniform sink + window, one panel per task and length.

Reads the ``--json`` file(s) of ``benchmarks/quality.py`` (several files are merged, later ones win)
and draws a grid: one row per task (perplexity as % above dense, passkey and needle as the share of
prompts answered), one column per length; x is the KV each plan keeps at that length (its own
``density(N)``), one line per series, dense as a dotted line.

    python benchmarks/quality_plot.py quality.json --out benchmarks/results/2026-12-02-quality-vs-kv.png \\
        --series "calibrated v3=smollm2-135m-d15,smollm2-135m-d25,smollm2-135m-d35,smollm2-135m-d50"

Without ``--series``: "uniform" = every ``uniform <d>`` row, "calibrated" = every other plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/quality_plot.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from headwise.extras import require  # noqa: E402

TASK_LABELS = {"perplexity": "perplexity, % above dense", "passkey": "passkey, share answered",
               "niah": "multi-key needle, share answered"}


def load_results(paths: list[Path]) -> tuple[dict, dict]:
    """Merge quality.py JSON files into ``{(row, task, length): value}`` and ``{plan: {length: kept}}``."""
    values, kept = {}, {}
    for path in paths:
        data = json.loads(path.read_text())
        if "kv_kept" not in data:
            raise SystemExit(f"{path} has no 'kv_kept' field; re-run benchmarks/quality.py with --json from this "
                             "checkout (its --cache makes that a table-only run).")
        for item in data["results"]:
            values[(item["row"], item["task"], int(item["length"]))] = item["value"]
        for name, per_length in data["kv_kept"].items():
            kept.setdefault(name, {}).update({int(n): k for n, k in per_length.items()})
    return values, kept


def score(value) -> float:
    """A retrieval ``[correct, total]`` as a share, a perplexity as itself."""
    return value[0] / value[1] if isinstance(value, list) else float(value)


def series_points(values: dict, kept: dict, plans: list[str], mode: str, task: str, length: int
                  ) -> list[tuple[float, float]]:
    """``[(KV kept, metric)]`` for the plans of one series that have a result, sorted by KV kept."""
    dense = values.get(("dense", task, length))
    points = []
    for name in plans:
        value = values.get((f"{name} | {mode}", task, length))
        if value is None or length not in kept.get(name, {}):
            continue
        metric = score(value)
        if task == "perplexity":
            if dense is None:
                continue
            metric = 100.0 * (metric / float(dense) - 1.0)
        points.append((kept[name][length], metric))
    return sorted(points)


def draw(values: dict, kept: dict, series: dict[str, list[str]], mode: str, out: Path, title: str) -> None:
    """Write the PNG grid (tasks x lengths) to ``out``."""
    matplotlib = require("matplotlib", "benchmarks/quality_plot.py")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_LABELS if any(k[1] == t for k in values)]
    lengths = sorted({k[2] for k in values})
    fig, axes = plt.subplots(len(tasks), len(lengths), figsize=(3.6 * len(lengths), 2.9 * len(tasks)),
                             squeeze=False, sharex=True)
    for row, task in enumerate(tasks):
        for col, length in enumerate(lengths):
            ax = axes[row][col]
            for label, plans in series.items():
                points = series_points(values, kept, plans, mode, task, length)
                if points:
                    xs, ys = zip(*points)
                    ax.plot([100 * x for x in xs], ys, marker="o", linestyle="--" if "uniform" in label else "-",
                            label=label)
            dense = values.get(("dense", task, length))
            if dense is not None:
                ax.axhline(0.0 if task == "perplexity" else score(dense), color="black", linestyle=":",
                           linewidth=1, label="dense")
            if task == "perplexity":
                ax.set_ylim(bottom=0)
            else:
                ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{length} tokens")
            if col == 0:
                ax.set_ylabel(TASK_LABELS[task])
            if row == len(tasks) - 1:
                ax.set_xlabel("KV kept, % of dense")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_series(specs: list[str], kept: dict) -> dict[str, list[str]]:
    """``LABEL=plan,plan`` strings into ``{label: plans}``; by default uniform rows vs every other plan."""
    if not specs:
        uniform = [n for n in kept if n.startswith("uniform ")]
        return {"uniform sink + window": uniform, "calibrated": [n for n in kept if n not in uniform]}
    series = {}
    for spec in specs:
        label, sep, names = spec.rpartition("=")   # a label may hold "=", a plan name does not
        if not sep or not names.strip():
            raise SystemExit(f"--series takes LABEL=plan,plan,...; got {spec!r}.")
        plans = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in plans if n not in kept]
        if unknown:
            raise SystemExit(f"--series {label!r} names plans the JSON does not hold: {', '.join(unknown)}; "
                             f"it holds {', '.join(sorted(kept))}.")
        series[label.strip()] = plans
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="benchmarks/quality.py --json files")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--series", action="append", default=[],
                        help="LABEL=plan,plan,... (repeatable; plan names as in the quality table)")
    parser.add_argument("--mode", default="dense", help="the quality.py mode to draw (default: dense)")
    parser.add_argument("--title", default="Quality against KV kept")
    args = parser.parse_args()
    values, kept = load_results(args.json)
    draw(values, kept, parse_series(args.series, kept), args.mode, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
