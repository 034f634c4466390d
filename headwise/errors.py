"""Errors headwise raises on purpose (each message is one sentence that says what to do).

``HeadwiseError`` is the base; the ``headwise`` command prints any of them as one line on stderr and
exits with code 2 (``--debug`` shows the traceback). The concrete classes are also ``ValueError``s,
so code that catches ``ValueError`` around headwise calls keeps working.
"""

from __future__ import annotations


class HeadwiseError(Exception):
    """Base of every error headwise raises on purpose; its message is one sentence."""


class PlanError(HeadwiseError, ValueError):
    """A plan that cannot be used: malformed, or made for another model."""


class CalibrationError(HeadwiseError, RuntimeError):
    """The calibrator could not make a plan from what it was given (e.g. the MILP found none)."""


class InputError(HeadwiseError, ValueError):
    """A bad argument to a public entry (API, engine, CLI): wrong type, out of range, empty, unsupported."""
