"""Lean forwards for decode and prefill steps of Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

A decode step of a small model is dominated by dispatch, not arithmetic: the HF forward calls
about 60 torch ops and a dozen ``nn.Module`` calls per layer, on a handful of token rows. This
module runs the same computation, in the same order and dtypes, straight on the HF modules'
weights (shared, nothing copied): the linear layers through the native skinny kernel (one pass
over each weight), RMSNorm and RoPE as HF writes them, attention through the engine's
``layer_attention``. It is used for steps of at most ``skinny_linear.native.MAX_ROWS`` tokens on
CPU and only for the architectures it checks. Steps of more tokens (prefill) on those models run
``LeanDecoder.prefill_forward``: the HF forward's ops, in row tiles. Every other model goes through
the HF forward (``runner.ModelRunner.run``), which stays the reference.

When the native decode layers build (``kernels.decode_layer``), the layers run in C with an fp32
residual stream: a decode-only step's consecutive layers whose attention is plain paged softmax
(``ModelRunner.native_step``) in one call (norm, QKV, RoPE, KV write, attention, O projection, MLP);
any other layer as a native ``pre`` (norm, QKV, RoPE), the engine's ``layer_attention`` and a native
``post`` (O projection, MLP). Without them the torch ops below run (the reference of that kernel is
``kernels.decode_layer.naive``). Which path ran is logged once per kind of step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..kernels.decode_layer import Dims, LayerWeights
from ..kernels.decode_layer import native as layer_native
from ..kernels.skinny_linear import native as skinny_native

logger = logging.getLogger("headwise.engine")

#: Decoder classes whose layers compute exactly what ``LeanDecoder.forward`` does.
ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def lean_decoder(model) -> "LeanDecoder | None":
    """A ``LeanDecoder`` over ``model``, or ``None`` (with the reason logged) when it does not apply."""
    reason = _unsupported(model)
    if reason is not None:
        logger.info("engine: decode steps run the HF forward (%s)", reason)
        return None
    logger.info("engine: decode steps of <= %d tokens run the lean %s forward with native skinny linears",
                skinny_native.MAX_ROWS, type(model).__name__)
    return LeanDecoder(model)


def _unsupported(model) -> str | None:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not one of {sorted(ARCHITECTURES)}"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act is {config.hidden_act!r}, not 'silu'"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "the model has sliding-window layers of its own"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    if not skinny_native.available():
        return "the native skinny_linear kernel is not built here"
    for layer in model.model.layers:
        linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
        if any(not lin.weight.is_contiguous() or lin.weight.dtype not in (torch.float32, torch.bfloat16)
               for lin in linears):
            return "a linear layer's weight is not a contiguous fp32/bf16 matrix"
        if any(lin.bias is not None for lin in linears[3:]):
            return "o_proj or the MLP has a bias"
    return None


class LeanDecoder:
    """The decode forward of a recognised decoder, layer by layer on the HF modules' weights."""

    def __init__(self, model):
        base = model.model
        self.embed = base.embed_tokens
        self.layers = list(base.layers)
        self.final_norm = base.norm
        self.rotary = base.rotary_emb
        self.lm_head = model.lm_head
        text = model.config.get_text_config(decoder=True)
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        self._linears = [lin for layer in self.layers for lin in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        self.native = native_layers(self)
        self._native_pointers = None if self.native is None else self.native.matrix_pointers
        self._announced: set[str] = set()

    def _matrix_pointers(self) -> list[int]:
        """Where the layers' matrices live now (``_parameters`` read directly: 210 module attribute
        lookups through nn.Module cost ~0.7 ms a step; this tens of microseconds)."""
        return [lin._parameters["weight"].data_ptr() for lin in self._linears]

    def _announce(self, message: str) -> None:
        if message not in self._announced:
            self._announced.add(message)
            logger.info("engine: %s", message)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logit_rows: torch.Tensor,
                attend, native_step=None) -> torch.Tensor:
        """Logits of the step's sampling rows.

        Args:
            input_ids, positions: ``[T]`` int64, the step's packed tokens.
            logit_rows: ``[S]`` int64, the rows whose logits are wanted.
            attend: ``attend(layer, q [H, T, D], k [Hkv, T, D], v [Hkv, T, D], scale) -> [T, H, D]``.
            native_step: ``(layers, pool_args)`` from ``ModelRunner.native_step`` for a decode-only step
                (``None`` otherwise): layers whose attention the native call may run, and the pool.

        Returns:
            ``[S, V]`` logits (fp32 from the native layers, else the model's dtype).
        """
        if self.native is not None:
            if self._matrix_pointers() != self._native_pointers:
                logger.info("engine: the model's weights moved since the engine was built; native decode layers rebuilt")
                self.native = native_layers(self)
                self._native_pointers = None if self.native is None else self.native.matrix_pointers
            if self.native is not None:
                return self._forward_native(input_ids, positions, logit_rows, attend, native_step)
        return self.prefill_forward(input_ids, positions, logit_rows, attend, linear=skinny_native.skinny_linear)

    def _forward_native(self, input_ids, positions, logit_rows, attend, native_step) -> torch.Tensor:
        T, H, Hkv, D = input_ids.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        dtype = self.embed.weight.dtype
        x = self.embed(input_ids).float()                                                # [T, hidden] fp32
        cos, sin = self.rotary(x[None], positions[None])                                 # [1, T, D] fp32
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        native_attention, pool = native_step if native_step is not None else ([False] * len(self.layers), None)
        index, L = 0, len(self.layers)
        while index < L:
            if native_attention[index]:
                stop = index
                while stop < L and native_attention[stop]:
                    stop += 1
                self._announce(f"decode-only steps run consecutive layers with paged softmax attention in one native "
                               f"call (decode_layer.c, {self.native.isa})")
                self.native.run(x, cos, sin, **pool, first=index, last=stop)
                index = stop
                continue
            self._announce(f"layers run as native pre/post around the engine's attention (decode_layer.c, "
                           f"{self.native.isa})")
            attn = self.layers[index].self_attn
            q, k, v = self.native.pre(index, x, cos, sin)
            o = attend(index, q.to(dtype).transpose(0, 1), k.to(dtype).transpose(0, 1), v.to(dtype).transpose(0, 1),
                       attn.scaling)
            self.native.post(index, x, o.reshape(T, H * D))
            index += 1
        if logit_rows.numel() == 0:
            return x.new_empty(0, self.lm_head.weight.shape[0])
        norm = self.final_norm
        h = x.index_select(0, logit_rows)
        h = norm.weight.float() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
        return skinny_native.skinny_linear(h, self.lm_head.weight, self.lm_head.bias)

    @torch.inference_mode()
    def prefill_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logit_rows: torch.Tensor,
                        attend, linear=F.linear) -> torch.Tensor:
        """Logits of the step's sampling rows for a step of many tokens (prefill chunks, maybe decode tokens);
        also a decode step's torch ops where the native decode layers do not build (``linear`` the skinny
        kernel; a step of few rows is one tile).

        The HF forward's ops in its order and dtypes, but everything that works row by row (norms, QKV,
        RoPE, O projection, residual adds, MLP) runs ``PREFILL_TILE_BYTES``-sized tiles of rows: the
        temporaries of a tile stay in cache and in the allocator's heap, where whole-prompt temporaries
        (50-100 MB at 8k rows) came from fresh ``mmap`` pages, faulted in on every op. Only attention
        (``attend``) sees all rows at once. After the last layer's attention only the sampling rows go on
        (its O projection and MLP for the other rows would feed nothing: 1/L of the linears saved). Linear
        layers run ``linear`` (``F.linear`` by default, which the runner's linear mode routes).

        Args:
            input_ids, positions: ``[T]`` int64, the step's packed tokens.
            logit_rows: ``[S]`` int64, the rows whose logits are wanted.
            attend: ``attend(layer, q [H, T, D], k [Hkv, T, D], v [Hkv, T, D], scale) -> [T, H, D]``.
            linear: ``linear(x, weight, bias=None)``, ``F.linear``'s signature.

        Returns:
            ``[S, V]`` logits in the model's dtype.
        """
        T, H, Hkv, D = input_ids.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        x = self.embed(input_ids)                                                        # [T, hidden]
        cos, sin = self.rotary(x[None], positions[None])                                 # [1, T, D]
        cos, sin = cos[0, :, None], sin[0, :, None]                                      # [T, 1, D]
        widest = max(x.shape[1], self.layers[0].mlp.gate_proj.weight.shape[0], H * D)
        tile = max(PREFILL_MIN_TILE, PREFILL_TILE_BYTES // (widest * x.element_size()))
        tiles = [(a, min(a + tile, T)) for a in range(0, T, tile)]
        q, k, v = x.new_empty(T, H, D), x.new_empty(T, Hkv, D), x.new_empty(T, Hkv, D)  # every layer's, reused
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            for a, b in tiles:
                h = _rms_norm(x[a:b], layer.input_layernorm)
                qt = linear(h, attn.q_proj.weight, attn.q_proj.bias).view(b - a, H, D)
                kt = linear(h, attn.k_proj.weight, attn.k_proj.bias).view(b - a, Hkv, D)
                v[a:b] = linear(h, attn.v_proj.weight, attn.v_proj.bias).view(b - a, Hkv, D)
                if self.qk_norm:
                    qt, kt = _rms_norm(qt, attn.q_norm), _rms_norm(kt, attn.k_norm)
                q[a:b], k[a:b] = _rope(qt, cos[a:b], sin[a:b]), _rope(kt, cos[a:b], sin[a:b])
            o = attend(index, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn.scaling).reshape(T, H * D)
            if index == len(self.layers) - 1:       # the last layer's other rows feed nothing: only the sampled go on
                x, o = x.index_select(0, logit_rows), o.index_select(0, logit_rows)
                tiles = [(a, min(a + tile, len(logit_rows))) for a in range(0, len(logit_rows), tile)]
            mlp = layer.mlp
            for a, b in tiles:
                xt = x[a:b]
                xt += linear(o[a:b], attn.o_proj.weight, attn.o_proj.bias)
                h = _rms_norm(xt, layer.post_attention_layernorm)
                xt += linear(F.silu(linear(h, mlp.gate_proj.weight)) * linear(h, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        return linear(_rms_norm(x, self.final_norm), self.lm_head.weight, self.lm_head.bias)


#: Row tiles of ``LeanDecoder.prefill_forward``: rows per tile = this over the widest row of a
#: temporary (the MLP's), at least ``PREFILL_MIN_TILE``: 1,365 rows for SmolLM2-135M's 1,536-wide fp32
#: MLP, 431 for Qwen2.5-0.5B's 4,864 (the GEMMs run as fast at 512-1,024 rows as at 8k here).
PREFILL_TILE_BYTES = 8 << 20
PREFILL_MIN_TILE = 128


def native_layers(lean: LeanDecoder) -> "layer_native.DecodeLayers | None":
    """The native decode layers over ``lean``'s modules, or ``None`` (reason logged) when they do not build here.

    Matrices are the modules' own tensors (shared; ``LeanDecoder.forward`` rebuilds this when they move);
    biases and norm weights are fp32 copies taken here (small; the same tensors when the model is fp32).
    """
    if not layer_native.available():
        logger.info("engine: the native decode layers are not built here; decode layers run as torch ops")
        return None
    dtypes = {lin.weight.dtype for lin in lean._linears}
    if len(dtypes) != 1:
        logger.info("engine: the linear layers mix dtypes %s; decode layers run as torch ops", sorted(map(str, dtypes)))
        return None
    first = lean.layers[0]
    attn = first.self_attn
    dims = Dims(E=lean.embed.weight.shape[1], H=lean.num_heads, Hkv=lean.num_kv_heads, D=lean.head_dim,
                F=first.mlp.gate_proj.weight.shape[0], eps=first.input_layernorm.variance_epsilon,
                qk_eps=attn.q_norm.variance_epsilon if lean.qk_norm else 0.0, scale=attn.scaling)

    def fp32(t):
        return None if t is None else t.detach().float().contiguous()

    layers = []
    for layer in lean.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(LayerWeights(
            q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight, o=a.o_proj.weight,
            gate=m.gate_proj.weight, up=m.up_proj.weight, down=m.down_proj.weight,
            q_bias=fp32(a.q_proj.bias), k_bias=fp32(a.k_proj.bias), v_bias=fp32(a.v_proj.bias),
            input_norm=fp32(layer.input_layernorm.weight), post_norm=fp32(layer.post_attention_layernorm.weight),
            q_norm=fp32(a.q_norm.weight) if lean.qk_norm else None, k_norm=fp32(a.k_norm.weight) if lean.qk_norm else None))
    if any(layer.self_attn.scaling != dims.scale for layer in lean.layers):
        logger.info("engine: layers have different attention scales; decode layers run as torch ops")
        return None
    return layer_native.DecodeLayers(dims, layers)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """HF's LlamaRMSNorm, op for op (fp32 statistics, weight applied in the input dtype)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's ``apply_rotary_pos_emb`` on ``[T, heads, D]`` with ``cos, sin [T, 1, D]``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
