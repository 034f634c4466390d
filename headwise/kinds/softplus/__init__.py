"""``softplus`` kind: softplus / exp attention with a length scale and re-weighting (LSSA / LSSAR),
over a normal KV cache (a window's sink + span; by default everything)."""

from ..base import Kind
from .spec import Softplus

KIND = Kind(
    name="softplus", spec=Softplus,
    attention="headwise.kinds.softplus.attention:SoftplusGroup",
    engine="headwise.kinds.softplus.engine:softplus_engine_group",
    fit="headwise.kinds.softplus.fit",
    example="headwise.kinds.softplus.spec:example",
    mark="S",
    description="softplus (or exp) attention with a length scale and re-weighting over a window's KV",
)

__all__ = ["KIND", "Softplus"]
