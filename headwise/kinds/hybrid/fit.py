"""``headwise fit hybrid``: the lightning fitting (``headwise.kinds.lightning.fit``) with an exact
sink + window in place, converting the best heads to ``hybrid`` heads."""

from __future__ import annotations

from ..lightning.fit import add_arguments as add_linear_arguments
from ..lightning.fit import fit_linear

HELP = "fit hybrid heads (sink + exact window + linear attention over older keys) and convert the best ones"


def add_arguments(p) -> None:
    """``headwise fit lightning``'s options plus the exact part's ``--window`` and ``--sink``."""
    add_linear_arguments(p)
    p.add_argument("--window", type=int, required=True,
                   help="exact softmax over the last WINDOW keys (and the sink), linear attention over older ones; "
                        "fitted with the window in place")
    p.add_argument("--sink", type=int, default=0, help="exact keys kept at the start")


def run(args) -> int:
    """``headwise fit hybrid``."""
    from .spec import Hybrid

    if args.window < 1:
        raise SystemExit(f"--window must be at least 1, got {args.window}.")
    if args.sink < 0:
        raise SystemExit(f"--sink must be 0 or more, got {args.sink}.")

    def make_head(fit, name):
        return Hybrid(sink=args.sink, window=args.window, decay=float(fit.decay),
                      feature_dim=2 * fit.k_weight.shape[-1], weights=name)

    return fit_linear(args, "hybrid", make_head, window=args.window, sink=args.sink)
