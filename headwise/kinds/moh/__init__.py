"""``moh`` kind: Mixture-of-Head routing, per-token top-k query heads of a layer's routed pool (fitted router)."""

from ..base import Kind
from .spec import MoH

KIND = Kind(
    name="moh", spec=MoH,
    attention="headwise.kinds.moh.attention:MoHGroup",
    engine="headwise.kinds.moh.engine:MoHEngineGroup",
    fit="headwise.kinds.moh.fit",
    example="headwise.kinds.moh.spec:example",
    mark="M",
    description="a router runs the top_k query heads of the layer's pool per token; the others output their mean",
)

__all__ = ["KIND", "MoH"]
