"""Lean forward for decode steps of Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

A decode step of a small model is dominated by dispatch, not arithmetic: the HF forward calls
about 60 torch ops and a dozen ``nn.Module`` calls per layer, on a handful of token rows. This
module runs the same computation, in the same order and dtypes, straight on the HF modules'
weights (shared, nothing copied): the linear layers through the native skinny kernel (one pass
over each weight), RMSNorm and RoPE as HF writes them, attention through the engine's
``layer_attention``. It is used only for steps of at most ``skinny_linear.native.MAX_ROWS``
tokens on CPU and only for the architectures it checks; every other step, and every other
model, goes through the HF forward (``runner.ModelRunner.run``), which stays the reference.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

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

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, logit_rows: torch.Tensor,
                attend) -> torch.Tensor:
        """Logits of the step's sampling rows.

        Args:
            input_ids, positions: ``[T]`` int64, the step's packed tokens.
            logit_rows: ``[S]`` int64, the rows whose logits are wanted.
            attend: ``attend(layer, q [H, T, D], k [Hkv, T, D], v [Hkv, T, D], scale) -> [T, H, D]``.

        Returns:
            ``[S, V]`` logits in the model's dtype.
        """
        T, H, Hkv, D = input_ids.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        x = self.embed(input_ids)                                                        # [T, hidden]
        cos, sin = self.rotary(x[None], positions[None])                                 # [1, T, D]
        cos, sin = cos[0, :, None], sin[0, :, None]                                      # [T, 1, D]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm)
            q = _linear(h, attn.q_proj).view(T, H, D)
            k = _linear(h, attn.k_proj).view(T, Hkv, D)
            v = _linear(h, attn.v_proj).view(T, Hkv, D)
            if self.qk_norm:
                q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            o = attend(index, q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn.scaling)
            x = x + _linear(o.reshape(T, H * D), attn.o_proj)
            h = _rms_norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + _linear(F.silu(_linear(h, mlp.gate_proj)) * _linear(h, mlp.up_proj), mlp.down_proj)
        if logit_rows.numel() == 0:
            return x.new_empty(0, self.lm_head.weight.shape[0])
        h = _rms_norm(x.index_select(0, logit_rows), self.final_norm)
        return _linear(h, self.lm_head)


def _linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return skinny_native.skinny_linear(x, linear.weight, linear.bias)


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
