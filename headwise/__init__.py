"""headwise: cheaper long-context inference of Hugging Face LLMs, one attention head at a time."""

from .models import load_model
from .patches import expected_length, kv_bytes, patch_model, unpatch_model
from .plan import Plan, PlanError, load_plan

__all__ = ["patch_model", "unpatch_model", "expected_length", "kv_bytes", "Plan", "PlanError", "load_plan",
           "load_model"]
__version__ = "0.1.0"
