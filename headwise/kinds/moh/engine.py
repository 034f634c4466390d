"""How the headwise engine runs ``moh`` heads (``Kind.engine``).

The KV layout is the softmax one (sink + ring, or everything for the default dense rule): every
token's KV is written to the pool, routed out or not. Attention routes per token with the kind
folder's own group (``MoHGroup``): a prefill chunk runs ``routed_attention`` over the chunk's
cached KV and its own keys; a decode step passes ``paged_decode`` only the (sequence, KV head)
rows with at least one selected query head, so a KV head whose query heads are all routed out for
a sequence is not read. Routed-out heads output their fitted mean. A group that does not route
(``top_k`` = its query heads) runs the engine's plain softmax group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import torch

from ...engine.groups import SoftmaxEngineGroup
from ...kernels.paged_decode import paged_decode
from ...kernels.routed_attention import routed_attention
from ..base import HeadSpec
from .attention import MoHGroup

if TYPE_CHECKING:
    from ...engine.step import LayerStep


class MoHEngineGroup:
    """One layer's ``moh`` heads in the engine (see the module docstring)."""

    def __init__(self, layer: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor]):
        self.group = MoHGroup(layer, tuple(heads), tuple(specs), weights)
        self.softmax = SoftmaxEngineGroup()

    def prefill(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """``q [1, Hg * G, n, D]``, ``k, v [1, Hg, n, D]`` (the chunk's own tokens) -> ``[1, Hg * G, n, D]``."""
        if not self.group.routes:
            return self.softmax.prefill(step, heads, q, k, v)
        seq = step.prefill_seq
        sink, span = seq.sink[step.layer, heads].to(q.device), seq.span[step.layer, heads].to(q.device)
        q_pos = step.prefill_pos[None]                                             # [1, n]
        k, v, k_pos = step.prefill_keys(heads, k, v)
        active = self.group.route(q, q_pos)
        out = routed_attention(q, k, v, q_pos, k_pos, sink, span[None], step.scale, active, backend=step.backend)
        return self.group.fill_routed_out(out, active, q_pos)

    def decode(self, step: "LayerStep", heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """``q [Bd, Hg * G, D]`` -> ``[Bd, Hg * G, D]``; only the (sequence, KV head) rows with a selected
        query head are read."""
        if not self.group.routes:
            return self.softmax.decode(step, heads, q, k, v)
        G = self.group.group_size
        pos = step.decode_pos
        active = self.group.route(q[:, :, None], pos[:, None])[..., 0]                   # [Bd, Hg * G]
        out = torch.zeros_like(q)
        for j, h in enumerate(heads):
            rows = active[:, j * G:(j + 1) * G].any(1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            table = step.decode_tables[rows, h:h + 1]                                    # [R, 1, M]
            out[rows, j * G:(j + 1) * G] = paged_decode(
                q[rows, j * G:(j + 1) * G], step.k_pool, step.v_pool, step.pos_pool, table, pos[rows],
                step.decode_sink[h:h + 1], step.decode_span[rows, h:h + 1], step.scale, backend=step.backend)
        return self.group.fill_routed_out(out[:, :, None], active[:, :, None], pos[:, None])[:, :, 0]
