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
    platforms nothing is registered: the CUDA backend is not built yet, and a plan given there is
    refused at start-up by ``cpu.HeadwiseCPUBackend`` never being selected (see the README).
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
