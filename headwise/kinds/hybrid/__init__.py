"""``hybrid`` kind: sink + short exact softmax window + decayed linear attention over older keys (LoLCATs-style)."""

from ..base import register_family
from .attention import HybridGroup
from .spec import Hybrid

register_family(Hybrid.family, HybridGroup)

__all__ = ["Hybrid", "HybridGroup"]
