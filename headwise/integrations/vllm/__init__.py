"""vLLM plugin: runs a headwise plan inside vLLM's paged KV cache (``vllm serve``, ``vllm.LLM``).

vLLM finds the plugin through the ``vllm.general_plugins`` entry point ``headwise =
headwise.integrations.vllm:register`` and calls ``register()`` in every vLLM process. On CPU it
replaces vLLM's ``CPU_ATTN`` backend by ``HeadwiseCPUBackend`` (a subclass); on CUDA
``--attention-backend HEADWISE`` picks ``HeadwiseTritonBackend`` (a subclass of vLLM's Triton
backend). Both are inert (vLLM's own implementation runs) unless a plan is given:

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
#: The ``--attention-backend`` name of the CUDA backend, and its dotted path.
CUDA_NAME = "HEADWISE"
CUDA_BACKEND = "headwise.integrations.vllm.cuda.HeadwiseTritonBackend"

__all__ = ["register", "plan_spec", "PLAN_KEY", "ENV_VAR", "CPU_BACKEND", "CUDA_NAME", "CUDA_BACKEND"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register headwise's attention backends.

    On every platform, the name ``HEADWISE`` (``--attention-backend HEADWISE``) resolves to
    ``HeadwiseTritonBackend``, the CUDA backend (a subclass of vLLM's Triton backend; vLLM's CPU
    platform ignores a selected backend and runs ``CPU_ATTN``). On a CPU platform, ``CPU_ATTN``
    resolves to ``HeadwiseCPUBackend`` from then on, and headwise's KV cache spec for all-window layers
    (``kv_spec.SinkWindowSpec``) is registered with its manager. Both are inert without a plan. On CUDA a plan is
    read only when ``--attention-backend HEADWISE`` is given: the plugin registers before vLLM
    picks a backend and cannot see that choice (README, "Serve with vLLM").
    """
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if CUDA_NAME in AttentionBackendEnum.__members__:            # registered before in this process
        register_backend(AttentionBackendEnum[CUDA_NAME], CUDA_BACKEND)
    else:
        register_backend(CUDA_NAME, CUDA_BACKEND)
    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        from .kv_spec import register_kv_spec

        register_kv_spec()
