"""``softplus`` kind: softplus / exp attention with a length scale and re-weighting (LSSA / LSSAR),
over a normal KV cache (a window's sink + span; by default everything)."""

from ..base import register_family
from .attention import SoftplusGroup, head_params
from .spec import NONLINEARITIES, SCALE_RULES, Softplus

register_family(Softplus.family, SoftplusGroup)

__all__ = ["Softplus", "SoftplusGroup", "head_params", "NONLINEARITIES", "SCALE_RULES"]
