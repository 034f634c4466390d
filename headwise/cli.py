"""The ``headwise`` command. Each area adds its subcommands through a ``register(subparsers)``
function in its own module; heavy imports happen inside the command functions."""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

# Modules that define ``register(subparsers)``; one line per area.
COMMAND_MODULES = [
    "headwise.demo",
    "headwise.models_cli",
    "headwise.eval.cli",
    "headwise.calibrate.cli",
    "headwise.calibrate.fit_cli",
    "headwise.plan_cli",
    "headwise.engine.cli",
    "headwise.integrations.vllm.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headwise", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log which kernels and plans run")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def parse_lengths(text: str, minimum: int = 1) -> list[int]:
    """``--lengths`` value ``"1024,2048"`` -> sorted unique token counts, each at least ``minimum``."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--lengths must be comma-separated token counts such as 1024,2048,4096, got {text!r}.")
    if not values or values[0] < minimum:
        raise SystemExit(f"--lengths must be token counts of at least {minimum}, got {text!r}.")
    return values


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "headwise " + shlex.join(argv)   # recorded in what commands write (plans, reports)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
