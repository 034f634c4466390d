"""``window`` kind: sink + local window softmax heads (StreamingLLM / MoA elastic spans)."""

from ..base import Kind
from .spec import Window

KIND = Kind(
    name="window", spec=Window,
    attention="headwise.kinds.softmax:SoftmaxKVGroup",
    engine="headwise.engine.groups:SoftmaxEngineGroup",
    candidates="headwise.kinds.window.candidates:candidates",
    presets="headwise.kinds.window.spec:PRESETS",
    example="headwise.kinds.window.spec:example",
    vllm=True, mark="",
    description="softmax over the first `sink` tokens and the last clamp(alpha + beta*N, 1, N)",
)

__all__ = ["KIND", "Window"]
