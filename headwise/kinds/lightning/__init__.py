"""``lightning`` kind: decayed linear attention heads with fitted Hedgehog feature maps (constant state)."""

from ..base import Kind
from .spec import Lightning

KIND = Kind(
    name="lightning", spec=Lightning,
    attention="headwise.kinds.lightning.attention:LightningGroup",
    engine="headwise.engine.groups:RecurrentEngineGroup",
    fit="headwise.kinds.lightning.fit",
    example="headwise.kinds.lightning.spec:example",
    mark="L",
    description="decayed linear attention with fitted feature maps; a constant F x (D+1) state, no KV",
)

__all__ = ["KIND", "Lightning"]
