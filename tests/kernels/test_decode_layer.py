"""``decode_layer`` native kernel against its torch reference (``naive``): whole decode steps over a
paged pool, and the pre/post halves, for Llama-, Qwen2- (Q/K/V biases) and Qwen3-like (q/k norms)
layers with GQA and MHA, fp32 and bf16, and for the builds a CPU without AVX512-BF16 or without
AVX-512 runs (forced through ``isa``)."""

from __future__ import annotations

import pytest
import torch

from headwise.kernels.decode_layer import Dims, LayerWeights, naive, native

pytestmark = pytest.mark.usefixtures("all_threads")      # the native kernels' OpenMP loops

# (E, H, Hkv, D, F, biases, qk norms)
SHAPES = {
    "llama-gqa": (96, 6, 2, 16, 128, False, False),
    "qwen2-bias-gqa": (64, 4, 2, 32, 96, True, False),
    "qwen3-qknorm": (128, 4, 1, 64, 160, False, True),
    "mha": (48, 3, 3, 16, 64, False, False),
}
ISAS = ["native", "no-avx512bf16", "avx2", "generic"]


def make_layers(shape, wdtype, layers=2, seed=0):
    E, H, Hkv, D, F, bias, qk = shape
    g = torch.Generator().manual_seed(seed)

    def mat(o, i):
        return (torch.randn(o, i, generator=g) / i ** 0.5).to(wdtype).contiguous()

    def vec(n, base=0.0):
        return base + 0.2 * torch.randn(n, generator=g)

    dims = Dims(E=E, H=H, Hkv=Hkv, D=D, F=F, eps=1e-5, qk_eps=1e-6, scale=D ** -0.5)
    out = [LayerWeights(q=mat(H * D, E), k=mat(Hkv * D, E), v=mat(Hkv * D, E), o=mat(E, H * D), gate=mat(F, E),
                        up=mat(F, E), down=mat(E, F), q_bias=vec(H * D) if bias else None,
                        k_bias=vec(Hkv * D) if bias else None, v_bias=vec(Hkv * D) if bias else None,
                        input_norm=vec(E, 1.0), post_norm=vec(E, 1.0), q_norm=vec(D, 1.0) if qk else None,
                        k_norm=vec(D, 1.0) if qk else None) for _ in range(layers)]
    return dims, out


def rope_tables(positions, D, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    angles = positions.float()[:, None] * inv[None]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().contiguous(), emb.sin().contiguous()


def make_step(dims, L, lengths, kv_dtype, bs=8, seed=1, window=(2, 5)):
    """A pool holding ``lengths[t] - 1`` tokens of each sequence (scattered blocks), the step writing
    token ``lengths[t] - 1``. Even KV heads are dense, odd ones keep ``window`` = (sink, span)."""
    g = torch.Generator().manual_seed(seed)
    T, Hkv, D = len(lengths), dims.Hkv, dims.D
    M = max(-(-n // bs) for n in lengths)
    P = L * T * Hkv * M + 3
    k_pool = torch.randn(P, bs, 1, D, generator=g).to(kv_dtype)
    v_pool = torch.randn(P, bs, 1, D, generator=g).to(kv_dtype)
    pos_pool = torch.full((P, bs), -1, dtype=torch.long)
    blocks = torch.randperm(P, generator=g)
    tables = torch.full((L, T, Hkv, M), -1, dtype=torch.int32)
    sink = torch.zeros(L, Hkv, dtype=torch.long)
    span = torch.zeros(L, T, Hkv, dtype=torch.long)
    dst, src, pos, offsets, used = [], [], [], [0], 0
    for layer in range(L):
        for t, n in enumerate(lengths):
            for h in range(Hkv):
                need = -(-n // bs)
                table = blocks[used:used + need]
                used += need
                tables[layer, t, h, :need] = table.to(torch.int32)
                for p in range(n - 1):                                   # tokens already in the pool
                    pos_pool[table[p // bs], p % bs] = p
                dst.append(int(table[(n - 1) // bs]) * bs + (n - 1) % bs)
                src.append(t * Hkv + h)
                pos.append(n - 1)
                if h % 2:
                    sink[layer, h], span[layer, t, h] = window
                else:
                    span[layer, t, h] = n
        offsets.append(len(dst))
    q_pos = torch.tensor([n - 1 for n in lengths])
    return dict(k_pool=k_pool, v_pool=v_pool, pos_pool=pos_pool, write_offsets=torch.tensor(offsets),
                write_dst=torch.tensor(dst), write_src=torch.tensor(src), write_pos=torch.tensor(pos), tables=tables,
                q_pos=q_pos, sink=sink, span=span)


def clone_step(step):
    return {k: v.clone() for k, v in step.items()}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_decode_step_matches_reference(name, dtype, isa):
    if not native.available(isa):
        pytest.skip(f"the {isa} build of decode_layer.c is not available here")
    dims, layers = make_layers(SHAPES[name], dtype, layers=3)
    lengths = [1, 9, 21]
    step = make_step(dims, len(layers), lengths, dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(lengths), dims.E, generator=g)
    cos, sin = rope_tables(step["q_pos"], dims.D)
    ref_step, got_step = clone_step(step), clone_step(step)
    ref = naive.decode_layers(dims, layers, x.clone(), cos, sin, **ref_step)
    got = native.DecodeLayers(dims, layers, isa=isa).run(x.clone(), cos, sin, **got_step)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    assert torch.equal(got_step["pos_pool"], ref_step["pos_pool"])
    for pool in ("k_pool", "v_pool"):
        torch.testing.assert_close(got_step[pool].float(), ref_step[pool].float(), **tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_pre_and_post_match_reference(name, isa):
    if not native.available(isa):
        pytest.skip(f"the {isa} build of decode_layer.c is not available here")
    dims, layers = make_layers(SHAPES[name], torch.float32, layers=1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, dims.E, generator=g)
    cos, sin = rope_tables(torch.tensor([0, 3, 4, 100, 2000]), dims.D)
    lib = native.DecodeLayers(dims, layers, isa=isa)
    for got, ref in zip(lib.pre(0, x, cos, sin), naive.pre_attention(dims, layers[0], x, cos, sin)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    o = torch.randn(5, dims.H * dims.D, generator=g)
    torch.testing.assert_close(lib.post(0, x.clone(), o), naive.post_attention(dims, layers[0], x, o),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_bf16_kv_writes_round_like_torch(isa):
    """The keys/values a bf16 step writes are ``k.to(torch.bfloat16)`` of the kernel's own fp32 keys, bit for bit
    (AVX512-BF16's vcvtneps2bf16 where built with it, the scalar rounding otherwise)."""
    if not native.available(isa):
        pytest.skip(f"the {isa} build of decode_layer.c is not available here")
    dims, layers = make_layers(SHAPES["qwen2-bias-gqa"], torch.bfloat16, layers=1)
    lengths = [4, 17]
    step = make_step(dims, 1, lengths, torch.bfloat16)
    x = torch.randn(len(lengths), dims.E, generator=torch.Generator().manual_seed(5)) * 30
    cos, sin = rope_tables(step["q_pos"], dims.D)
    lib = native.DecodeLayers(dims, layers, isa=isa)
    _, k, v = lib.pre(0, x, cos, sin)
    lib.run(x.clone(), cos, sin, **step)
    D = dims.D
    dst, src = step["write_dst"], step["write_src"]
    assert torch.equal(step["k_pool"].view(-1, D)[dst], k.reshape(-1, D)[src].bfloat16())
    assert torch.equal(step["v_pool"].view(-1, D)[dst], v.reshape(-1, D)[src].bfloat16())


def test_bad_inputs_are_refused_with_a_sentence():
    dims, layers = make_layers(SHAPES["mha"], torch.float32, layers=1)
    lib = native.DecodeLayers(dims, layers)
    with pytest.raises(ValueError, match="1 to 16 contiguous fp32 rows"):
        lib.pre(0, torch.randn(17, dims.E), *rope_tables(torch.arange(17), dims.D))
    mixed = [LayerWeights(**{**layers[0].__dict__, "o": layers[0].o.bfloat16()})]
    with pytest.raises(ValueError, match="one dtype"):
        native.DecodeLayers(dims, mixed)
