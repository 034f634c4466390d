"""``with headwise.patched(model, plan):``: ``patch_model`` for the length of a block."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from . import is_patched, patch_model, unpatch_model


@contextlib.contextmanager
def patched(model, plan: Any, **options: Any) -> Iterator[Any]:
    """Patch ``model`` with ``plan`` inside the block and undo it on exit, also when the block raises.

    ``options`` are ``patch_model``'s (``target_length``, ``backend``, ``prefill``). Yields the
    patched model. A model that is already patched is refused (as ``patch_model`` refuses it), so
    leaving the block never undoes a patch the caller made.
    """
    patch_model(model, plan, **options)
    try:
        yield model
    finally:
        if is_patched(model):
            unpatch_model(model)
