"""Random inputs for the attention kernel tests, in the shapes the patch layer and engine pass."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

#: Window spans relative to a sequence's length ``n``: smaller than, equal to and larger than it.
WINDOWS = {"win_lt": lambda n: max(1, n // 4), "win_eq": lambda n: n, "win_gt": lambda n: n + 37}

#: Absolute tolerances against the fp32 reference: fp32 differs by summation order only; bf16
#: backends compute in fp32 from the same bf16 inputs, so the gap is the bf16 rounding of the
#: output (relative 2**-8) plus a summation-order ulp.
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@dataclass
class Case:
    """Arguments of ``sink_window_attention`` (see ``headwise.kernels.sink_window.naive``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    sink: torch.Tensor
    span: torch.Tensor
    scale: float

    def args(self):
        return self.q, self.k, self.v, self.q_pos, self.k_pos, self.sink, self.span, self.scale


def batch_lengths(length: int, batch: int) -> list[int]:
    """Mixed lengths: the longest is ``length``, the others shorter (padding on them)."""
    return [max(1, length * (batch - i) // batch) for i in range(batch)]


def spans_for(lengths: list[int], Hkv: int, window: str, dense_head: bool = True) -> torch.Tensor:
    """``[B, Hkv]`` spans from a window rule; heads differ by a few tokens, head 0 may be dense (span N)."""
    rule = WINDOWS[window]
    span = torch.tensor([[rule(n) + 3 * h for h in range(Hkv)] for n in lengths], dtype=torch.long)
    if dense_head and Hkv > 1:
        span[:, 0] = torch.tensor(lengths)
    return span


def prefill_case(length: int, gqa: int, sink: int, window: str, padding: str, dtype: torch.dtype,
                 batch: int = 3, Hkv: int = 2, D: int = 16, queries: int | None = None, seed: int = 0) -> Case:
    """Prefill as the patch layer passes it: ``k_pos [B, 1, S]`` real positions with left or right padding.

    ``queries`` (default: all ``length``) keeps only the last queries, i.e. a prompt chunk whose
    earlier keys are already there.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = batch_lengths(length, batch)
    S = length
    pos = torch.full((batch, S), -1, dtype=torch.long)
    for b, n in enumerate(lengths):
        if padding == "left":
            pos[b, S - n:] = torch.arange(n)
        else:
            pos[b, :n] = torch.arange(n)
    Q = S if queries is None else queries
    H = Hkv * gqa
    return Case(
        q=torch.randn(batch, H, Q, D, generator=g).to(dtype),
        k=torch.randn(batch, Hkv, S, D, generator=g).to(dtype),
        v=torch.randn(batch, Hkv, S, D, generator=g).to(dtype),
        q_pos=pos[:, S - Q:].clone(),
        k_pos=pos[:, None, :],
        sink=torch.tensor([sink + h for h in range(Hkv)], dtype=torch.long) if sink else torch.zeros(Hkv, dtype=torch.long),
        span=spans_for(lengths, Hkv, window),
        scale=D ** -0.5,
    )


def ring_cache(lengths: list[int], Hkv: int, sink: torch.Tensor, span: torch.Tensor, D: int,
               dtype: torch.dtype, extra_slots: int = 5, seed: int = 0):
    """A per-head cache as ``HeadwiseLayer`` keeps it during decode: kept keys in scrambled slot order.

    Each (sequence, head) holds its sink and the last ``span`` positions (plus a few keys that
    already left the window, which attention must ignore), shuffled over ``C`` slots, the rest -1.

    Returns:
        ``(k, v [B, Hkv, C, D], k_pos [B, Hkv, C] int64)``.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    kept = []
    for b, n in enumerate(lengths):
        row = []
        for h in range(Hkv):
            start = max(0, n - int(span[b, h]) - 3)                  # 3 stale keys before the window
            positions = sorted(set(range(min(n, int(sink[h])))) | set(range(start, n)))
            row.append(positions)
        kept.append(row)
    C = max(len(p) for row in kept for p in row) + extra_slots
    k_pos = torch.full((B, Hkv, C), -1, dtype=torch.long)
    for b in range(B):
        for h in range(Hkv):
            slots = torch.randperm(C, generator=g)[:len(kept[b][h])]
            k_pos[b, h, slots] = torch.tensor(kept[b][h], dtype=torch.long)
    k = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, C, D, generator=g).to(dtype)
    return k, v, k_pos


def decode_case(length: int, gqa: int, sink: int, window: str, dtype: torch.dtype, batch: int = 3,
                Hkv: int = 2, D: int = 16, seed: int = 0):
    """One decode step over ``ring_cache``: ``(q [B, H, D], k, v, q_pos [B], k_pos, sink, span, scale)``.

    The last batch row is idle (``q_pos = -1``) when ``batch > 2``, as in an engine batch slot.
    """
    g = torch.Generator().manual_seed(seed + 1)
    lengths = batch_lengths(length, batch)
    sink_t = torch.tensor([sink + h for h in range(Hkv)], dtype=torch.long) if sink else torch.zeros(Hkv, dtype=torch.long)
    span = spans_for(lengths, Hkv, window)
    k, v, k_pos = ring_cache(lengths, Hkv, sink_t, span, D, dtype, seed=seed)
    q_pos = torch.tensor([n - 1 for n in lengths], dtype=torch.long)
    if batch > 2:
        q_pos[-1] = -1
    q = torch.randn(batch, Hkv * gqa, D, generator=g).to(dtype)
    return q, k, v, q_pos, k_pos, sink_t, span, D ** -0.5


def paged(k: torch.Tensor, v: torch.Tensor, k_pos: torch.Tensor, block_size: int, heads_per_block: int,
          spare_blocks: int = 3, seed: int = 0):
    """The same cache as a paged pool with scattered blocks and holes in the block tables.

    Args:
        k, v: ``[B, Hkv, C, D]``; k_pos: ``[B, Hkv, C]``; heads in one block (``heads_per_block``
            consecutive KV heads) must have equal ``k_pos`` rows (they share the block's slots).

    Returns:
        ``(k_pool, v_pool [P, block_size, Hb, D], pos_pool [P, block_size], block_tables [B, Ht, M] int32)``
        in ``paged_decode``'s layout; tables hold one unused (-1) entry in front of the real ones.
    """
    g = torch.Generator().manual_seed(seed)
    B, Hkv, C, D = k.shape
    Hb = heads_per_block
    Ht = Hkv // Hb
    per_table = -(-C // block_size)
    pad = per_table * block_size - C
    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    k_pos = torch.nn.functional.pad(k_pos, (0, pad), value=-1)
    P = B * Ht * per_table + spare_blocks
    ids = torch.randperm(P, generator=g)[:B * Ht * per_table].view(B, Ht, per_table)
    k_pool = torch.zeros(P, block_size, Hb, D, dtype=k.dtype)
    v_pool = torch.zeros(P, block_size, Hb, D, dtype=v.dtype)
    pos_pool = torch.full((P, block_size), -1, dtype=torch.long)
    for b in range(B):
        for t in range(Ht):
            heads = slice(t * Hb, (t + 1) * Hb)
            assert bool((k_pos[b, heads] == k_pos[b, t * Hb]).all()), "heads sharing a block need equal positions"
            for i in range(per_table):
                slots = slice(i * block_size, (i + 1) * block_size)
                block = int(ids[b, t, i])
                k_pool[block] = k[b, heads, slots].transpose(0, 1)
                v_pool[block] = v[b, heads, slots].transpose(0, 1)
                pos_pool[block] = k_pos[b, t * Hb, slots]
    tables = torch.cat([torch.full((B, Ht, 1), -1, dtype=torch.long), ids], dim=-1).to(torch.int32)
    return k_pool, v_pool, pos_pool, tables


def triton_marks(backend: str = "", **_) -> list:
    """Marks of a grid case (``tests.grids.grid(marks=...)``): ``triton`` when it runs the Triton backend."""
    return [pytest.mark.triton] if backend == "triton" else []


def backend_params(names) -> list:
    """Backend names as ``pytest.param``, the ``triton`` one marked ``triton``."""
    return [pytest.param(name, marks=triton_marks(name)) for name in names]
