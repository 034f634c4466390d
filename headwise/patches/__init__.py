"""Apply a plan to a ``transformers`` model, explicitly and reversibly (docs/design.md, "Patching transformers").

``patch_model`` registers the "headwise" attention and mask functions with transformers'
interfaces, selects them with ``set_attn_implementation``, and adds one forward pre-hook on the
decoder that gives every fresh cache ``HeadwiseLayer``s. No ``forward`` is replaced and nothing
happens at import; ``unpatch_model`` restores the previous attention implementation and removes
the hook.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicCache

from ..errors import InputError
from ..kernels import check_backend
from ..plan import PREFILL_MODES, Plan
from .attention import NAME, headwise_attention, headwise_mask
from .cache import HeadwiseLayer, install_layers, kv_bytes
from .runtime import _RUNTIMES, Runtime

logger = logging.getLogger("headwise")

__all__ = ["patch_model", "unpatch_model", "expected_length", "kv_bytes", "is_patched"]


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def _configs(model) -> list[Any]:
    configs = [model.config, _decoder(model).config]
    return list({id(c): c for c in configs}.values())


def _install_cache_hook(runtime: Runtime):
    def pre_forward(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None and kwargs.get("use_cache"):
            kwargs["past_key_values"] = cache = DynamicCache()
        if isinstance(cache, Cache) and not any(isinstance(layer, HeadwiseLayer) for layer in cache.layers):
            if cache.get_seq_length() == 0:
                install_layers(cache, runtime)
            else:
                logger.warning("headwise: the model got a %s that already holds tokens; attention follows the plan "
                               "but that cache keeps every token.", type(cache).__name__)
        return args, kwargs

    return pre_forward


def is_patched(model) -> bool:
    return getattr(model, "_headwise", None) is not None


def _check_model(model, entry: str) -> None:
    """``InputError`` unless ``model`` looks like a loaded ``transformers`` model."""
    if not (hasattr(model, "config") and hasattr(model, "set_attn_implementation")):
        raise InputError(f"{entry} needs a loaded transformers causal LM (e.g. from headwise.load_model() or "
                         f"AutoModelForCausalLM.from_pretrained), got {type(model).__name__}.")


EXTRAPOLATION = 16          # lengths up to this many times the model's context are accepted (softplus heads extrapolate)


#: ``(name, n, context)`` already warned about by ``_check_length``.
_WARNED: set[tuple[str, int, int]] = set()


def _check_length(name: str, n: object, model) -> int:
    """``n`` as a token count in ``[1, EXTRAPOLATION x the model's context]``, else ``InputError``.

    Beyond the context itself only a warning: kinds such as softplus run there on purpose."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise InputError(f"{name} must be a whole number of tokens, got {n!r}.")
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 1 << 20
    if not 1 <= n <= EXTRAPOLATION * context:
        raise InputError(f"{name} must be between 1 and {EXTRAPOLATION} x the model's context of {context} tokens "
                         f"(prompt + new tokens), got {n}.")
    if n > context and (name, n, context) not in _WARNED:
        _WARNED.add((name, n, context))              # once per length: callers set it per prompt
        logger.warning("headwise: %s of %d tokens is beyond the model's context of %d tokens.", name, n, context)
    return n


def patch_model(model, plan: Plan | str, *, target_length: int | None = None, backend: str = "auto",
                prefill: str | None = None):
    """Make ``model`` run ``plan``: per KV head, its sink + window (or dense) attention and cache.

    Args:
        model: a ``transformers`` causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS``.
        plan: a ``Plan``, a plan JSON path, ``"dense"`` or ``"uniform:<density>"``.
        target_length: the length ``N`` sequences will reach (prompt + new tokens), which sizes
            elastic spans; ``None`` uses each sequence's current length. See ``expected_length``.
        backend: kernel backend for attention ("auto", "naive", ...).
        prefill: ``"sparse"`` or ``"dense"`` overrides the plan's ``prefill`` (``None``: the plan's).
            Dense prefill runs every head dense in forwards of more than one query; the cache then
            keeps only each head's sink + window, so decoding follows the plan.

    Returns:
        ``model``, patched in place; ``unpatch_model(model)`` undoes it.
    """
    _check_model(model, "patch_model")
    if target_length is not None:
        _check_length("target_length", target_length, model)
    check_backend(backend)
    if is_patched(model):
        raise RuntimeError("model is already patched by headwise; call unpatch_model(model) before patching again.")
    plan = Plan.from_spec(plan, model)
    if prefill not in (None, *PREFILL_MODES):
        raise InputError(f"prefill must be one of {list(PREFILL_MODES)} or None, got {prefill!r}.")
    text_config = model.config.get_text_config(decoder=True)
    native = [i for i, t in enumerate(getattr(text_config, "layer_types", None) or []) if t != "full_attention"]
    if native:
        raise InputError(f"layers {native[:5]} use {text_config.layer_types[native[0]]!r} attention, which headwise "
                         "does not combine with a plan; patch a model whose layers all use full attention.")
    AttentionInterface.register(NAME, headwise_attention)
    AttentionMaskInterface.register(NAME, headwise_mask)
    runtime = Runtime(plan, target_length, backend, prefill)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    hook = _decoder(model).register_forward_pre_hook(_install_cache_hook(runtime), with_kwargs=True)
    for config in _configs(model):
        _RUNTIMES[id(config)] = runtime
    model._headwise = {"runtime": runtime, "hook": hook, "previous": previous}
    logger.info("headwise: patched %s with a plan of density %.3f at 4k (%s)", plan.model.name,
                plan.density(4096), plan.calibration.get("method", "custom"))
    return model


def unpatch_model(model):
    """Undo ``patch_model``: previous attention implementation back, hook removed. Returns ``model``."""
    state = getattr(model, "_headwise", None)
    if state is None:
        raise RuntimeError("model is not patched by headwise; nothing to undo.")
    state["hook"].remove()
    model.set_attn_implementation(state["previous"] or "sdpa")
    for config in _configs(model):
        _RUNTIMES.pop(id(config), None)
    del model._headwise
    return model


@contextlib.contextmanager
def expected_length(model, n: int | None) -> Iterator[None]:
    """Within the block, size elastic spans for sequences that will reach ``n`` tokens.

    Use around ``generate`` with ``n = prompt_length + max_new_tokens`` so every step uses the
    spans the plan was calibrated for; cached decoding then equals full recomputation. ``n`` must
    lie in ``[1, 16 x the model's context]`` (a larger one would make every elastic span keep
    everything; beyond the context itself it warns); ``None`` uses each sequence's own length.
    """
    _check_model(model, "expected_length")
    if not is_patched(model):
        raise InputError("expected_length needs a model patched by headwise; call patch_model(model, plan) first.")
    if n is not None:
        _check_length("expected_length's n", n, model)
    runtime: Runtime = model._headwise["runtime"]
    before, runtime.target_length = runtime.target_length, n
    try:
        yield
    finally:
        runtime.target_length = before
