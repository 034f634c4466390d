"""How the headwise engine runs ``hybrid`` heads (``headwise.engine.kinds``).

A hybrid head keeps its sink and a ring of ``window + 1`` recent keys in KV blocks (the softmax
layout), plus a per-request recurrent state like a ``lightning`` head. A decode step writes its
key before attention, overwriting the ring slot of position ``t - ring <= t - window - 1``, so the
key at ``t - window`` that joins the state at this step is still in the pool; a prefill chunk reads
the pool's keys (taken before the chunk's writes) and its own.
"""

from __future__ import annotations

import torch

from ...engine.kinds import HeadLayout, decode_pages, softmax_layout
from ...kernels.sink_window import sink_window_attention
from ..base import group_factory


class HybridKV:
    """``hybrid`` heads: KV blocks for sink + ``window + 1`` keys and a recurrent state per request."""

    name = "hybrid"

    def layout(self, spec, n: int, block_size: int) -> HeadLayout:
        return softmax_layout(spec.sink, spec.window + 1, n, block_size)

    def bind(self, layer: int, heads: list[int], specs: list, weights) -> "HybridEngineGroup":
        group = group_factory(specs[0], f"layer {layer}")(layer, tuple(heads), tuple(specs), weights)
        return HybridEngineGroup(group, (layer, heads[0]))


class HybridEngineGroup:
    """One layer's hybrid heads in the engine: state in ``Sequence.states[(layer, first head)]``
    (``[Hg, F, D + 1]`` fp32), KV in the pool."""

    def __init__(self, group, key: tuple[int, int]):
        self.group = group
        self.key = key

    def prefill(self, step, heads: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [1, Hg * G, n, D]``, ``k, v [1, Hg, n, D]`` (the chunk's own tokens) -> ``[1, Hg * G, n, D]``."""
        seq = step.prefill_seq
        q_pos = step.prefill_pos[None]                                                  # [1, n]
        cached = step.cached_kv(heads)
        if cached is not None:
            ck, cv, cpos = cached
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            k_pos = torch.cat([cpos, q_pos[:, None].expand(1, len(heads), -1)], dim=-1)
        else:
            k_pos = q_pos[:, None]
        state = seq.states.get(self.key) if seq.num_computed > 0 else None
        state = None if state is None else state[None]
        if step.dense_prefill:           # every head reads all it has; the state is still built
            seq.states[self.key] = self.group.fold_state(k, v, q_pos, k_pos, state)[0]
            zeros = torch.zeros(len(heads), dtype=torch.long, device=q.device)
            full = torch.full((1, len(heads)), int(step.prefill_pos[-1]) + 1, dtype=torch.long, device=q.device)
            return sink_window_attention(q, k, v, q_pos, k_pos, zeros, full, step.scale, backend=step.backend)
        out, new = self.group.run(q, k, v, q_pos, k_pos, state, step.scale, step.backend)
        seq.states[self.key] = new[0]
        return out

    def decode(self, step, heads: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [Bd, Hg * G, D]`` -> ``[Bd, Hg * G, D]``; the step's ``k, v`` are already in the pool."""
        keys, values, key_pos, _, _ = decode_pages(step, heads)                              # [Bd, Hg, C, D]
        seqs = step.plan.decode_seqs
        states = torch.stack([seq.states[self.key] for seq in seqs])
        out, new = self.group.run(q[:, :, None], keys, values, step.decode_pos[:, None], key_pos, states, step.scale,
                                  step.backend)
        for seq, state in zip(seqs, new.unbind(0)):
            seq.states[self.key] = state
        return out[:, :, 0]


ENGINE_KIND = HybridKV()
