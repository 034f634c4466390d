"""``engine.step.decode_pages``: a kind's decode KV is gathered only over the blocks its heads hold."""

from types import SimpleNamespace

import torch

from headwise.engine.step import decode_pages
from headwise.kernels.paged_decode.naive import gather_pages


def test_decode_pages_cuts_the_table_to_the_blocks_its_heads_hold():
    torch.manual_seed(0)
    P, bs, D = 12, 4, 8
    k_pool, v_pool = torch.randn(P, bs, 1, D), torch.randn(P, bs, 1, D)
    pos_pool = torch.arange(P * bs).reshape(P, bs)
    tables = torch.full((2, 3, 6), -1, dtype=torch.int32)        # [Bd, Hkv, M]: head 0 dense-wide
    tables[:, 0] = torch.arange(6)
    tables[0, 1, :2], tables[1, 1, :1] = torch.tensor([6, 7]), torch.tensor([8])
    tables[0, 2, :1], tables[1, 2, :2] = torch.tensor([9]), torch.tensor([10, 11])
    layer = 1
    seqs = []
    for row in (tables >= 0).sum(-1):                               # blocks held per head, compact from 0
        nblocks = torch.zeros(2, 3, dtype=torch.long)
        nblocks[layer] = row
        seqs.append(SimpleNamespace(nblocks=nblocks))
    step = SimpleNamespace(k_pool=k_pool, v_pool=v_pool, pos_pool=pos_pool, decode_tables=tables, layer=layer,
                           plan=SimpleNamespace(decode_seqs=seqs),
                           decode_sink=torch.tensor([0, 1, 2]), decode_span=torch.tensor([[5, 6, 7], [8, 9, 10]]))

    keys, values, key_pos, sink, span = decode_pages(step, [1, 2])

    assert keys.shape == (2, 2, 2 * bs, D) and key_pos.shape == (2, 2, 2 * bs)
    full_k, full_v, full_pos = gather_pages(k_pool, v_pool, pos_pool, tables[:, 1:])
    assert torch.equal(keys, full_k[:, :, : 2 * bs]) and torch.equal(values, full_v[:, :, : 2 * bs])
    assert torch.equal(key_pos, full_pos[:, :, : 2 * bs])
    assert (full_pos[:, :, 2 * bs:] == -1).all()                 # nothing the heads read was cut
    assert sink.tolist() == [1, 2] and span.tolist() == [[6, 7], [9, 10]]
    assert decode_pages(step, [0, 1, 2])[0].shape == (2, 3, 6 * bs, D)
