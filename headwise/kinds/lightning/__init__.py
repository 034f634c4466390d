"""``lightning`` kind: decayed linear attention heads with fitted Hedgehog feature maps (constant state)."""

from ..base import register_family
from .attention import LightningGroup
from .feature_map import hedgehog_features
from .spec import Lightning

register_family(Lightning.family, LightningGroup)

__all__ = ["Lightning", "LightningGroup", "hedgehog_features"]
