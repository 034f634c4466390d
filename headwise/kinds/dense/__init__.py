"""``dense`` kind: full causal softmax; runs in the ``sink_window`` family of ``headwise.kinds.window``."""

from ..window import SoftmaxKVGroup  # noqa: F401  (registers the family this kind runs in)
from .spec import Dense

__all__ = ["Dense"]
