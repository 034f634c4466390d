"""Errors headwise raises on purpose (each message is one sentence that says what to do)."""

from __future__ import annotations


class PlanError(ValueError):
    """A plan that cannot be used: malformed, or made for another model."""
