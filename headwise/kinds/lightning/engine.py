"""How the headwise engine runs ``lightning`` heads (``headwise.engine.kinds``)."""

from ...engine.kinds import LINEAR_STATE as ENGINE_KIND  # noqa: F401
