"""The calibrator's ``dense`` candidate: the head that keeps every key."""

from __future__ import annotations

from .spec import Dense


def candidates(lengths: list[int], **settings) -> list[Dense]:
    """``[Dense()]`` at any lengths and settings (the other kinds' grid settings do not apply)."""
    return [Dense()]
