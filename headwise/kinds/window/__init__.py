"""``window`` kind: sink + local window softmax heads (family ``sink_window``, shared with ``dense``)."""

from ..base import register_family
from .attention import SoftmaxKVGroup, dense_attention
from .spec import Window

register_family(Window.family, SoftmaxKVGroup)

__all__ = ["Window", "SoftmaxKVGroup", "dense_attention"]
