"""Offline long-context evaluation: task generators, the ``headwise`` lm-eval model, reports.

Submodules: ``tasks`` (generators), ``taskfiles`` (lm-eval YAML + JSONL), ``lm`` (the registered
lm-eval model; imports lm-eval), ``runner``/``report`` (plan comparison), ``cli`` (``headwise eval``),
``passkey`` (the demo's interface). Importing this package does not import lm-eval.
"""

from .passkey import PasskeySample, passkey_samples
from .tasks import GENERATORS, Sample, generate

__all__ = ["GENERATORS", "Sample", "generate", "PasskeySample", "passkey_samples"]
