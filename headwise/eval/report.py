"""Result tables and plots of a plan comparison: JSON, markdown, PNG."""

from __future__ import annotations

import json
from pathlib import Path

from .taskfiles import KINDS, task_name

RETRIEVAL_METRIC = "contains,none"
PERPLEXITY_METRIC = "word_perplexity,none"


def summarize(lm_results: dict[str, dict], kinds: list[str], lengths: list[int]) -> dict[str, dict]:
    """``{plan: {kind: {length: value}}}`` from ``{plan: lm-eval results['results']}``.

    Retrieval kinds give the mean ``contains`` score (1.0 = every answer found); ``perplexity``
    gives lm-eval's word perplexity.
    """
    summary: dict[str, dict] = {}
    for plan, results in lm_results.items():
        summary[plan] = {}
        for kind in kinds:
            metric = PERPLEXITY_METRIC if KINDS[kind].max_gen_toks is None else RETRIEVAL_METRIC
            summary[plan][kind] = {length: results[task_name(kind, length)][metric] for length in lengths}
    return summary


def markdown_table(summary: dict[str, dict], kinds: list[str], lengths: list[int], trials: dict[str, int],
                   seconds: dict[str, float]) -> str:
    """One row per (plan, task): retrieval accuracy in % (perplexity as is) at each length."""
    header = "| plan | task | " + " | ".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths) + " |"
    lines = [header, "|---|---|" + "---:|" * len(lengths)]
    for plan, per_kind in summary.items():
        for kind in kinds:
            if KINDS[kind].max_gen_toks is None:
                cells = [f"{per_kind[kind][n]:.2f}" for n in lengths]
                label = f"{kind} (word ppl, {trials[kind]} docs)"
            else:
                cells = [f"{100 * per_kind[kind][n]:.0f}%" for n in lengths]
                label = f"{kind} ({trials[kind]} trials)"
            lines.append(f"| {plan} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Wall time per plan: " + ", ".join(f"{p} {s / 60:.1f} min" for p, s in seconds.items()))
    return "\n".join(lines)


def plot(summary: dict[str, dict], kinds: list[str], lengths: list[int], path: str | Path) -> None:
    """PNG: retrieval accuracy vs context length per task (and their mean), one line per plan;
    perplexity vs length per plan. Without matplotlib (the ``plot`` extra) it says so in one
    sentence on stderr and draws nothing (the JSON and markdown results are written either way)."""
    import sys

    from ..extras import MissingExtraError, require

    try:
        matplotlib = require("matplotlib", "the eval plot")
    except MissingExtraError as error:
        print(f"headwise: plot not drawn: {error}", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    retrieval = [k for k in kinds if KINDS[k].max_gen_toks is not None]
    panels = (["mean"] if len(retrieval) > 1 else []) + retrieval + [k for k in kinds if k not in retrieval]
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for plan, per_kind in summary.items():
            if panel == "mean":
                ys = [100 * sum(per_kind[k][n] for k in retrieval) / len(retrieval) for n in lengths]
            elif panel in retrieval:
                ys = [100 * per_kind[panel][n] for n in lengths]
            else:
                ys = [per_kind[panel][n] for n in lengths]
            ax.plot(lengths, ys, marker="o", label=plan)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        if panel in retrieval or panel == "mean":
            ax.set_ylim(-5, 105)
            ax.set_ylabel("accuracy %")
            ax.set_title("mean of retrieval tasks" if panel == "mean" else panel)
        else:
            ax.set_ylabel("word perplexity")
            ax.set_title(panel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: str | Path, config: dict, lm_results: dict[str, dict], seconds: dict[str, float]) -> str:
    """Write ``config.json``, ``results.json``, ``results.md`` and ``results.png`` into ``out_dir``;
    returns the markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds, lengths = config["tasks"], config["lengths"]
    summary = summarize(lm_results, kinds, lengths)
    table = markdown_table(summary, kinds, lengths, config["trials"], seconds)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps({"summary": summary, "seconds": seconds, "lm_eval": lm_results},
                                                 indent=1, default=str) + "\n")
    (out / "results.md").write_text(table + "\n")
    plot(summary, kinds, lengths, out / "results.png")
    return table
