"""``dense`` kind: full causal softmax (the model's own attention)."""

from ..base import Kind
from .spec import Dense

KIND = Kind(
    name="dense", spec=Dense,
    attention="headwise.kinds.softmax:SoftmaxKVGroup",
    engine="headwise.engine.groups:SoftmaxEngineGroup",
    candidates="headwise.kinds.dense.candidates:candidates",
    presets="headwise.kinds.dense.spec:PRESETS",
    example="headwise.kinds.dense.spec:example",
    vllm=True, mark="D",
    description="full causal softmax over every token",
)

__all__ = ["KIND", "Dense"]
