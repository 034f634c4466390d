"""``moh`` kind: Mixture-of-Head routing, per-token top-k query heads of a layer's routed pool (fitted router)."""

from ..base import register_family
from .attention import MoHGroup, pair_magnitudes
from .spec import MoH

register_family(MoH.family, MoHGroup)

__all__ = ["MoH", "MoHGroup", "pair_magnitudes"]
