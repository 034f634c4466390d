"""``hybrid`` kind: sink + short exact softmax window + decayed linear attention over older keys (LoLCATs-style)."""

from ..base import Kind
from .spec import Hybrid

KIND = Kind(
    name="hybrid", spec=Hybrid,
    attention="headwise.kinds.hybrid.attention:HybridGroup",
    engine="headwise.engine.groups:RecurrentEngineGroup",
    fit="headwise.kinds.hybrid.fit",
    example="headwise.kinds.hybrid.spec:example",
    mark="H",
    description="exact softmax over sink + last `window` keys, fitted linear attention over older keys",
)

__all__ = ["KIND", "Hybrid"]
