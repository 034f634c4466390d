"""Heatmap of a plan: kept fraction ``kept(N) / N`` of every (layer, KV head), one panel per length."""

from __future__ import annotations

import os
import sys

from ..kinds import registry
from ..plan import Plan


def head_mark(kind: str) -> str:
    """The letter a head of ``kind`` gets on the heatmap (``Kind.mark``; "" for unmarked kinds)."""
    return registry.get(kind).mark


def plan_heatmap(plan: Plan, path: str | os.PathLike, lengths: list[int]) -> bool:
    """Write a PNG: rows are layers, columns KV heads; colour is the kept fraction at each length
    (KV entries only: a recurrent state is not counted), heads of marked kinds carry their kind's
    letter (``Kind.mark``, e.g. "D" dense). Uses matplotlib's Agg backend (no display needed).

    Without matplotlib (the ``plot`` extra) it draws nothing, says so in one sentence on stderr and
    returns False: the heatmap is a side output of ``plan show`` and ``calibrate``.
    """
    from ..extras import MissingExtraError, require

    try:
        matplotlib = require("matplotlib", "the plan heatmap")
    except MissingExtraError as error:
        print(f"headwise: heatmap not drawn: {error}", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, heads = plan.model.num_layers, plan.model.num_kv_heads
    fig, axes = plt.subplots(1, len(lengths), figsize=(1.2 + 0.55 * heads * len(lengths) + 1.2, 0.5 + 0.22 * layers),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, n in zip(axes[0], lengths):
        kept = np.array(plan.kept(n), dtype=float) / n
        image = ax.imshow(kept, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        for i, layer in enumerate(plan.layers):
            for h, head in enumerate(layer):
                mark = head_mark(head.kind)
                if mark:
                    # black on the bright (kept-a-lot) end of viridis, white on the dark end
                    ax.text(h, i, mark, ha="center", va="center", fontsize=7,
                            color="black" if kept[i, h] > 0.5 else "white")
        ax.set_title(f"N={n}: density {plan.density(n):.3f}", fontsize=9)
        ax.set_xticks(range(heads))
        ax.set_xlabel("KV head")
        ax.set_yticks(range(0, layers, max(1, layers // 10)))
    axes[0][0].set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="kept(N) / N")
    kinds = sorted(k for k in {head.kind for head in plan.heads} if head_mark(k))
    legend = ", ".join(f"{head_mark(k)} {k}" for k in kinds)
    fig.suptitle(f"{plan.model.name} ({plan.calibration.get('method', 'plan')})" + (f"; {legend}" if legend else ""),
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
