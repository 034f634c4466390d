"""The one way the calibrator and the kinds' fitting see inside a model's attention while it runs.

A Hugging Face model calls its attention through transformers' attention interface, so every
layer's attention can be routed through a function of ours by registering it under a name and
selecting that name; ``attention_override`` does this for the duration of a ``with`` block and puts
the model back on exit (the previous implementation and the parameters' ``requires_grad`` flags),
also after an error. After the block the function is disarmed: selecting its name by hand raises.
Three uses, from the most to the least invasive:

* **replace** the attention (``attention_override``): the profiler's custom autograd function that
  records the loss change of dropping each entry (``profile.py``), the gates' mix of full and local
  attention (``gates.py``);
* **observe** it (``observing``): transformers' sdpa runs unchanged and an observer sees each
  layer's ``query``/``key``/``value``/``output`` (softplus head statistics);
* **record** it (``capture``): one forward, and with ``gradients`` one backward of the summed
  next-token loss, keeping per layer the tensors asked for, as fp32 CPU copies (lightning/hybrid
  heads' ``q``/``k``/``v``, MoH's queries, head outputs and their loss gradients).

The model must be unpatched (``unpatch_model``): these read the model's own dense attention.
Inputs are one sequence, causal, no cache and no padding (the attention functions get no mask).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

FIELDS = ("query", "key", "value", "output")


def _no_mask(*args, **kwargs):
    """Mask-interface function of our attention names: the inputs are one causal sequence."""
    return None


@contextlib.contextmanager
def attention_override(model, attention: Callable, *, name: str = "headwise_override", freeze: bool = False,
                       prefill_only: bool = False) -> Iterator[None]:
    """Route every layer's attention of ``model`` through ``attention`` while inside.

    Args:
        model: an unpatched ``transformers`` model whose attention goes through the attention
            interface (Llama-style).
        attention: ``attention(module, query [B, H, T, D], key [B, Hkv, T, D], value [B, Hkv, T, D],
            attention_mask, scaling=None, dropout=0.0, **kwargs) -> (out [B, T, H, D], weights)``;
            ``module.layer_idx`` is the layer. ``attention_mask`` is ``None`` (causal).
        name: the name registered with transformers for it (one per use).
        freeze: turn off ``requires_grad`` of every parameter while inside (activation gradients
            only: the profile, the gates, MoH's output gradients).
        prefill_only: ``attention`` implements one full causal pass without dropout: a call with a
            cache (fewer queries than keys) or with dropout raises.
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    if getattr(model, "_headwise", None) is not None:
        raise RuntimeError("calibration reads the model's own attention; call unpatch_model(model) first.")
    armed = True

    def routed(module, query, key, *args, **kwargs):
        if not armed:
            raise RuntimeError(f"attention {name!r} ran outside its headwise.calibrate.capture block; "
                               "use the calibrator's functions instead of selecting it by hand.")
        if prefill_only and query.shape[-2] != key.shape[-2]:
            raise ValueError(f"attention {name!r} needs a full causal forward without a cache; call the model "
                             "with use_cache=False.")
        if prefill_only and kwargs.get("dropout"):
            raise ValueError(f"attention {name!r} does not implement dropout; set the model's attention_dropout to 0.")
        return attention(module, query, key, *args, **kwargs)

    AttentionInterface.register(name, routed)
    AttentionMaskInterface.register(name, _no_mask)
    previous = model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    if freeze:
        model.requires_grad_(False)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        armed = False
        model.set_attn_implementation(previous or "sdpa")
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def observing(model, observer: Callable, *, name: str = "headwise_observe", freeze: bool = False) -> Iterator[None]:
    """transformers' sdpa attention as usual, and ``observer(layer, query, key, value, output, scaling)``
    on what each layer saw: ``query [B, H, T, D]`` after RoPE, ``key``/``value [B, Hkv, T, D]``,
    ``output [B, T, H, D]`` (each query head's attention output, before ``o_proj``; the tensor the
    model continues with, so a gradient hook on it sees the loss gradient) and the softmax scale the
    layer passed (``None``: ``D ** -0.5``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def observed(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        observer(module.layer_idx, query, key, value, out, kwargs.get("scaling"))
        return out, weights

    with attention_override(model, observed, name=name, freeze=freeze):
        yield


@dataclass
class LayerCapture:
    """What ``capture`` kept of one layer, fp32 CPU (``None`` when not asked for): ``query [H, T, D]``
    (after RoPE), ``key``/``value [Hkv, T, D]``, ``output [T, H, D]`` (attention output per query
    head, before ``o_proj``) and, with gradients, ``output_grad [T, H, D]``: the gradient of the
    summed next-token cross-entropy with respect to ``output``."""

    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    output: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None


def _kept(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one sequence: ``logits [1, T, V]``, ``input_ids [1, T]``."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:], reduction="sum")


def capture(model, input_ids: torch.Tensor, fields: tuple[str, ...] = FIELDS,
            gradients: bool = False) -> list[LayerCapture]:
    """Run the unpatched ``model`` (sdpa) once on ``input_ids [1, T]`` and keep, per layer, the
    ``fields`` asked for (of ``FIELDS``) and, with ``gradients``, the output gradients from one
    backward pass of ``next_token_loss`` (parameters get no gradients; their flags are restored).

    Returns:
        One ``LayerCapture`` per layer, in layer order.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture takes one sequence of shape [1, T], got {tuple(input_ids.shape)}.")
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"capture can keep {', '.join(FIELDS)}, not {', '.join(sorted(unknown))}.")
    layers: dict[int, LayerCapture] = {}

    def observe(layer, query, key, value, output, scaling):
        seen = {"query": query, "key": key, "value": value, "output": output}
        record = layers[layer] = LayerCapture(**{f: _kept(seen[f][0]) for f in fields})
        if gradients:
            output.register_hook(lambda grad: setattr(record, "output_grad", _kept(grad[0])))

    ids = input_ids.to(model.device)
    with observing(model, observe, name="headwise_capture", freeze=True):
        if gradients:
            with torch.enable_grad():
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                next_token_loss(model(inputs_embeds=embeds, use_cache=False).logits, ids).backward()
        else:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
    return [layers[i] for i in sorted(layers)]
