"""The ``headwise`` command. Each area adds its subcommands through a ``register(subparsers)``
function in its own module; heavy imports happen inside the command functions.

Errors a user can fix (headwise's own ``HeadwiseError``s, a missing or unreadable file, a command's
one-sentence ``SystemExit``) print as one line on stderr with exit code 2; ``--debug`` shows the
traceback instead.
"""

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

USAGE_ERROR = 2          # argparse's code for a bad command line; headwise uses it for every user error


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every option that has a default, unless its help already names one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or not action.option_strings or not _shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _shows_default(action: argparse.Action) -> bool:
    """Whether an option's default says something: not None, not a flag's False, not an empty list."""
    default = action.default
    return not (default is None or default is False or default is argparse.SUPPRESS
                or (isinstance(default, list) and not default))


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose subcommands (any depth) show defaults in their help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def _add_action(self, action):
        # argparse skips the help of options without help text; give them one so the default shows
        if action.help is None and action.option_strings and _shows_default(action):
            action.help = ""
        return super()._add_action(action)


def add_threads(parser: argparse.ArgumentParser) -> None:
    """The ``--threads`` option every command that computes takes (applied by ``main``)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, usually one per core)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="headwise", description="headwise: cheaper long-context inference of Hugging Face LLMs, "
                                                 "one attention head at a time. `headwise COMMAND --help` for a "
                                                 "command's options.")
    parser.add_argument("--version", action="version", version=f"headwise {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log which kernels and plans run")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_debug_everywhere(parser)
    return parser


def _add_debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let ``--debug`` also follow a subcommand (``headwise generate ... --debug``); SUPPRESS keeps the
    top-level value when it is not given there."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                if "--debug" not in child._option_string_actions:
                    child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                       help="show the traceback of an error instead of one line")
                _add_debug_everywhere(child)


def parse_lengths(text: str, minimum: int = 1) -> list[int]:
    """``--lengths`` value ``"1024,2048"`` -> sorted unique token counts, each at least ``minimum``."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--lengths must be comma-separated token counts such as 1024,2048,4096, got {text!r}.")
    if not values or values[0] < minimum:
        raise SystemExit(f"--lengths must be token counts of at least {minimum}, got {text!r}.")
    return values


def error_line(error: BaseException) -> str | None:
    """The one line a user error prints as, or ``None`` when ``error`` is a bug (shown with its traceback).

    User errors: headwise's own errors, an ``OSError`` about a named file (missing, a directory, no
    permission), and a ``SystemExit`` carrying a message."""
    from .errors import HeadwiseError

    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, str) else None
    if isinstance(error, HeadwiseError):
        text = str(error)
    elif isinstance(error, OSError) and error.filename is not None:
        name = repr(str(error.filename))
        text = {FileNotFoundError: f"{name} does not exist; check the path.",
                IsADirectoryError: f"{name} is a directory; give a file.",
                NotADirectoryError: f"a part of {name} is not a directory; check the path.",
                PermissionError: f"no permission to use {name}; check its permissions."}.get(
            type(error), f"cannot use {name}: {(error.strerror or str(error)).rstrip('.')}.")
    elif type(error) in (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        text = str(error)                  # raised by headwise with its own sentence (no filename attribute)
    else:
        return None
    return " ".join(text.split())          # one line, whatever the message held


def _set_threads(args) -> None:
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {threads}.")
    import torch

    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "headwise " + shlex.join(argv)   # recorded in what commands write (plans, reports)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _set_threads(args)
        return int(args.func(args) or 0)
    except (Exception, SystemExit) as error:
        line = error_line(error)
        if line is None or args.debug:
            raise
        if not line.startswith("headwise"):
            line = f"headwise {args.command}: {line}"
        print(line, file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
