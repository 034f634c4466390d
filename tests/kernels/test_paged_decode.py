"""``paged_decode`` backends against the naive reference, and the naive paged path against ``sink_window``'s
reference with one query per sequence over the same (unpaged) cache."""

from __future__ import annotations

import itertools

import pytest
import torch

from headwise.kernels import paged_decode as op
from headwise.kernels.sink_window import naive as dense_naive
from tests.grids import listed
from tests.kernels.cases import TOLERANCE, WINDOWS, batch_lengths, decode_case, paged, spans_for

pytestmark = pytest.mark.usefixtures("all_threads")      # the native kernels' OpenMP loops

LAYOUTS = {"per-head-bs16": (16, 1), "per-head-bs5": (5, 1), "shared-bs16": (16, 2)}


def paged_case(length, gqa, sink, window, dtype, layout):
    q, k, v, q_pos, k_pos, sink_t, span, scale = decode_case(length, gqa, sink, window, dtype)
    block_size, heads_per_block = LAYOUTS[layout]
    if heads_per_block > 1:                                  # shared blocks: heads share slot positions
        k_pos = k_pos[:, :1].expand_as(k_pos).contiguous()
    pool = paged(k, v, k_pos, block_size, heads_per_block)
    return (q, k, v, q_pos, k_pos, sink_t, span, scale), (q, *pool, q_pos, sink_t, span, scale)


# Every fourth combination: each length, GQA ratio, sink, window and layout appears, in varied pairs.
DIMS = {"length": [1, 65, 1000], "gqa": [1, 3, 4], "sink": [0, 4, 64], "window": WINDOWS, "layout": LAYOUTS}
SAMPLED = [c for i, c in enumerate(itertools.product(*DIMS.values())) if i % 4 == 0]


def sampled(cases, **more):
    """``grid`` arguments over ``cases`` (some of the sampled combinations) times the ``more`` dimensions."""
    return listed(list(DIMS), cases, more, labels={"length": "len"})


@pytest.mark.parametrize(*sampled(SAMPLED))
def test_naive_paged_matches_dense_reference(length, gqa, sink, window, layout):
    (q, k, v, q_pos, k_pos, sink_t, span, scale), paged_args = paged_case(length, gqa, sink, window, torch.float32,
                                                                          layout)
    dense = dense_naive.sink_window_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink_t, span, scale)[:, :, 0]
    torch.testing.assert_close(op.paged_decode(*paged_args, backend="naive"), dense, **TOLERANCE[torch.float32])


@pytest.mark.parametrize(*sampled(SAMPLED[::2], dtype=[torch.float32, torch.bfloat16], backend=["cpu", "native"]))
def test_cpu_paged(length, gqa, sink, window, layout, dtype, backend):
    _, paged_args = paged_case(length, gqa, sink, window, dtype, layout)
    expected = op.paged_decode(*paged_args, backend="naive")
    got = op.paged_decode(*paged_args, backend=backend)
    assert got.shape == expected.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])


def test_mismatched_head_count_is_refused():
    _, (q, k_pool, v_pool, pos_pool, tables, q_pos, sink, span, scale) = paged_case(65, 3, 4, "win_lt", torch.float32,
                                                                                     "per-head-bs16")
    with pytest.raises(ValueError, match="block-table rows"):
        op.paged_decode(q, k_pool, v_pool, pos_pool, tables[:, :1], q_pos, sink, span, scale)


def test_native_kernel_builds_here():
    """CI machines have a C compiler: the native kernel must build, not silently fall back."""
    from headwise.kernels.paged_decode import native

    assert native.available()


@pytest.mark.parametrize(*sampled(SAMPLED[1::3]))
def test_native_paged_over_ragged_tables(length, gqa, sink, window, layout):
    """Tables with unused (-1) entries in the middle and rows of different widths, as the engine passes them."""
    _, (q, k_pool, v_pool, pos_pool, tables, q_pos, sink_t, span, scale) = paged_case(
        length, gqa, sink, window, torch.float32, layout)
    holes = torch.full((*tables.shape[:2], 3), -1, dtype=tables.dtype)
    ragged = torch.cat([holes, tables, holes], dim=-1)
    args = (q, k_pool, v_pool, pos_pool, ragged, q_pos, sink_t, span, scale)
    torch.testing.assert_close(op.paged_decode(*args, backend="native"), op.paged_decode(*args, backend="naive"),
                               **TOLERANCE[torch.float32])


def test_native_reads_strided_pools_in_place():
    """Pools that are views with a block stride (K and V interleaved per block, as vLLM's cache) give the same result."""
    _, (q, k_pool, v_pool, pos_pool, tables, q_pos, sink_t, span, scale) = paged_case(
        300, 3, 4, "win_lt", torch.float32, "per-head-bs16")
    both = torch.stack([k_pool, v_pool], dim=1)                      # [P, 2, bs, Hb, D]
    k_view, v_view = both[:, 0], both[:, 1]
    assert not k_view.is_contiguous()
    args = (q, k_view, v_view, pos_pool, tables, q_pos, sink_t, span, scale)
    torch.testing.assert_close(op.paged_decode(*args, backend="native"),
                               op.paged_decode(q, k_pool, v_pool, pos_pool, tables, q_pos, sink_t, span, scale,
                                               backend="naive"), **TOLERANCE[torch.float32])


def test_native_reads_blocks_of_384_slots():
    """vLLM's split KV parts (integrations/vllm/split.py) have 384-slot blocks."""
    q, k, v, q_pos, k_pos, sink, span, scale = decode_case(1000, 3, 64, "win_lt", torch.float32)
    pool = paged(k, v, k_pos, 384, 1)
    args = (q, *pool, q_pos, sink, span, scale)
    torch.testing.assert_close(op.paged_decode(*args, backend="native"), op.paged_decode(*args, backend="naive"),
                               **TOLERANCE[torch.float32])


# ---- paged_decode_logical: vLLM's block tables (blocks in position order, positions implied) ----------
def logical_case(length, gqa, sink, window, dtype, block_size, Hkv=3, D=16, batch=3, seed=0):
    """``(args of paged_decode_logical, dense reference args)``: the cache in vLLM's layout (``[P, bs, Hkv, D]``
    as a strided view of ``[P, Hkv, 2, bs, D]`` cells), each sequence's blocks scattered over the pool in
    position order, entries past its length -1, and its entries that no head reads (past the sinks, before
    every window) given back: set to block 0, vLLM's null block, which holds garbage."""
    g = torch.Generator().manual_seed(seed)
    lengths = batch_lengths(length, batch)
    sink_t = torch.tensor([sink + h for h in range(Hkv)]) if sink else torch.zeros(Hkv, dtype=torch.long)
    span = spans_for(lengths, Hkv, window, dense_head=False)
    M = -(-max(lengths) // block_size) + 2
    P = batch * M + 1
    cells = torch.randn(P, Hkv, 2, block_size, D, generator=g).to(dtype)
    cells[0] = 1e3                                                                   # the null block: never read
    order = (torch.randperm(P - 1, generator=g) + 1)[: batch * M].reshape(batch, M).to(torch.int32)
    table = torch.full((batch, M), -1, dtype=torch.int32)
    for b, n in enumerate(lengths):
        used = -(-n // block_size)
        table[b, :used] = order[b, :used]
        first_read = max(0, n - int(span[b].max()))                                 # earliest window position
        for j in range(-(-int(sink_t.max()) // block_size), first_read // block_size):
            table[b, j] = 0
    k_pool, v_pool = cells[:, :, 0].permute(0, 2, 1, 3), cells[:, :, 1].permute(0, 2, 1, 3)    # [P, bs, Hkv, D]
    q_pos = torch.tensor([n - 1 for n in lengths], dtype=torch.long)
    q = torch.randn(batch, Hkv * gqa, D, generator=g).to(dtype)
    # the same cache unpaged: [B, Hkv, M * bs, D] in position order, empty slots at position -1
    blocks = table.long().clamp(min=0)
    k = k_pool[blocks].permute(0, 3, 1, 2, 4).reshape(batch, Hkv, M * block_size, D)
    v = v_pool[blocks].permute(0, 3, 1, 2, 4).reshape(batch, Hkv, M * block_size, D)
    held = ((table >= 0) & (table != 0)).repeat_interleave(block_size, dim=1)          # [B, M * bs]
    k_pos = torch.where(held, torch.arange(M * block_size), -1)[:, None].expand(-1, Hkv, -1)
    scale = D ** -0.5
    return (q, k_pool, v_pool, table, q_pos, sink_t, span, scale, 0), (q, k, v, q_pos, k_pos, sink_t, span, scale)


LOGICAL_DIMS = {"length": [1, 65, 1000], "gqa": [1, 3], "sink": [0, 4, 64], "window": WINDOWS, "block": [16, 5]}
LOGICAL_CASES = [c for i, c in enumerate(itertools.product(*LOGICAL_DIMS.values())) if i % 3 == 0]


def logical_grid(cases, **more):
    return listed(list(LOGICAL_DIMS), cases, more, labels={"length": "len", "block": "bs"})


@pytest.mark.parametrize(*logical_grid(LOGICAL_CASES))
def test_naive_logical_matches_dense_reference(length, gqa, sink, window, block):
    args, (q, k, v, q_pos, k_pos, sink_t, span, scale) = logical_case(length, gqa, sink, window, torch.float32, block)
    dense = dense_naive.sink_window_attention(q[:, :, None], k, v, q_pos[:, None], k_pos, sink_t, span, scale)[:, :, 0]
    torch.testing.assert_close(op.paged_decode_logical(*args, backend="naive"), dense, **TOLERANCE[torch.float32])


@pytest.mark.parametrize(*logical_grid(LOGICAL_CASES[::2], dtype=[torch.float32, torch.bfloat16]))
def test_native_logical(length, gqa, sink, window, block, dtype):
    """The native kernel visits only each head's sink and window entries, skips the null block, reads vLLM's
    strided layout in place."""
    args, _ = logical_case(length, gqa, sink, window, dtype, block)
    got = op.paged_decode_logical(*args, backend="native")
    expected = op.paged_decode_logical(*args, backend="naive")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])
