"""How the headwise engine runs ``softplus`` heads (``Kind.engine``).

A softplus head keeps KV blocks exactly as a ``window`` head with the same sink and span does
(``engine.layout.head_layout`` from its ``kv_rule``), so the pool, block tables, ring writes and
preemption are the engine's own. Prefill chunks read the pool's cached KV plus their own keys
through ``kernels.softplus``.

Decode cost: each step gathers the group's pages into a dense ``[Bd, Hg, C, D]`` copy
(``engine.step.decode_pages``: only the blocks these heads hold) and runs ``kernels.softplus`` on
it, so a decode step copies the heads' kept KV once more than the native ``paged_decode`` kernel
of softmax heads, which reads it in place. A group of plain-softmax heads (exp, temperature 1, no
length scale, no re-weighting) runs the engine's softmax group instead, with the native kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from ...engine.groups import SoftmaxEngineGroup
from ...engine.step import decode_pages
from ...kernels.softplus import softplus_attention
from ..base import HeadSpec
from .attention import head_params

if TYPE_CHECKING:
    from ...engine.step import LayerStep


def softplus_engine_group(layer: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                          weights: Mapping[str, torch.Tensor]):
    """The engine group of a layer's softplus heads: softmax's own when their parameters are plain softmax."""
    params = head_params(specs)
    if bool(params.is_softmax().all()):
        return SoftmaxEngineGroup()
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

    def prefill(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """``q [1, Hg * G, n, D]``, ``k, v [1, Hg, n, D]`` (the chunk's own keys, not yet in the pool)
        -> ``[1, Hg * G, n, D]``."""
        seq = step.prefill_seq
        sink, span = seq.sink[step.layer, heads].to(q.device), seq.span[step.layer, heads].to(q.device)
        k, v, k_pos = step.prefill_keys(heads, k, v)
        return softplus_attention(q, k, v, step.prefill_pos[None], k_pos, sink, span[None], step.scale,
                                  self._params(q.device), backend=step.backend)

    def decode(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """``q [Bd, Hg * G, D]`` -> ``[Bd, Hg * G, D]``; ``k, v [Bd, Hg, D]`` are already in the pool."""
        keys, values, k_pos, sink, span = decode_pages(step, heads)
        out = softplus_attention(q[:, :, None], keys, values, step.decode_pos[:, None], k_pos, sink, span,
                                 step.scale, self._params(q.device), backend=step.backend)
        return out[:, :, 0]
