"""How the headwise engine runs ``softplus`` heads (``headwise.engine.kinds``).

A softplus head keeps KV blocks exactly as a ``window`` head with the same sink and span does
(``softmax_layout``), so the pool, block tables, ring writes and preemption are the engine's own.
Prefill chunks read the pool's cached KV plus their own keys through ``kernels.softplus``.

Decode cost: each step gathers the group's pages into a dense ``[Bd, Hg, C, D]`` copy
(``engine.kinds.decode_pages``: only the blocks these heads hold) and runs ``kernels.softplus`` on
it, so a decode step copies the heads' kept KV once more than the native ``paged_decode`` kernel
of softmax heads, which reads it in place (README, Engine: the torch gather path measured 87 ms
against 0.94 ms per layer in a contended microbenchmark). A group of plain-softmax heads (exp,
temperature 1, no length scale, no re-weighting) runs as ``SoftmaxKV`` instead, with the native
kernel.
"""

from __future__ import annotations

import torch

from ...engine.kinds import SOFTMAX_KV, HeadLayout, decode_pages, softmax_layout
from ...kernels.sink_window import sink_window_attention
from ...kernels.softplus import softplus_attention
from .attention import head_params


class SoftplusKV:
    """``softplus`` heads: softplus / exp attention with re-weighting over the sink + window kept in the pool."""

    name = "softplus_kv"

    def layout(self, spec, n: int, block_size: int) -> HeadLayout:
        return softmax_layout(spec.sink, spec.span(n), n, block_size)

    def bind(self, layer: int, heads: list[int], specs: list, weights):
        params = head_params(specs)
        if bool(params.is_softmax().all()):
            return SOFTMAX_KV                  # the same math as window / dense heads: their fast paths
        return SoftplusEngineGroup(params)


class SoftplusEngineGroup:
    """One layer's softplus heads in the engine (see the module docstring)."""

    def __init__(self, params):
        self.params = params
        self._on: dict = {}

    def _params(self, device: torch.device):
        if device not in self._on:
            self._on[device] = self.params.to(device)
        return self._on[device]

    def prefill(self, step, heads: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [1, Hg * G, n, D]``, ``k, v [1, Hg, n, D]`` (the chunk's own keys, not yet in the pool)
        -> ``[1, Hg * G, n, D]``."""
        seq = step.prefill_seq
        sink, span = seq.sink[step.layer, heads].to(q.device), seq.span[step.layer, heads].to(q.device)
        q_pos = step.prefill_pos[None]                                             # [1, n]
        cached = step.cached_kv(heads)
        if cached is not None:
            ck, cv, cpos = cached                                                  # [1, Hg, C, D], [1, Hg, C]
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            k_pos = torch.cat([cpos, q_pos[:, None].expand(1, len(heads), -1)], dim=-1)
        else:
            k_pos = q_pos[:, None]
        if step.dense_prefill:           # the prompt reads everything with softmax; the pool keeps the plan's KV
            full = torch.full_like(span, int(step.prefill_pos[-1]) + 1)
            return sink_window_attention(q, k, v, q_pos, k_pos, torch.zeros_like(sink), full[None], step.scale,
                                         backend=step.backend)
        return softplus_attention(q, k, v, q_pos, k_pos, sink, span[None], step.scale, self._params(q.device),
                                  backend=step.backend)

    def decode(self, step, heads: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [Bd, Hg * G, D]`` -> ``[Bd, Hg * G, D]``; ``k, v [Bd, Hg, D]`` are already in the pool."""
        keys, values, k_pos, sink, span = decode_pages(step, heads)
        out = softplus_attention(q[:, :, None], keys, values, step.decode_pos[:, None], k_pos, sink, span,
                                 step.scale, self._params(q.device), backend=step.backend)
        return out[:, :, 0]


ENGINE_KIND = SoftplusKV()
