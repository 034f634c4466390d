"""How the headwise engine runs ``window`` heads (``headwise.engine.kinds``)."""

from ...engine.kinds import SOFTMAX_KV as ENGINE_KIND  # noqa: F401
