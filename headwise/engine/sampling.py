"""``SamplingParams`` (vLLM's names) and the sampler that turns logits into next tokens."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from ..errors import InputError

# vLLM fields headwise does not implement, and the sentence that refuses each when it is not at its default.
REFUSED = {
    "n": (1, "SamplingParams.n must be 1: the engine makes one completion per request; repeat the prompt "
             "(with different seeds) for more."),
    "best_of": (None, "SamplingParams.best_of is not supported; leave it None and repeat the prompt instead."),
    "logprobs": (None, "SamplingParams.logprobs is not supported; leave it None (the engine returns token ids "
                       "and text only)."),
    "prompt_logprobs": (None, "SamplingParams.prompt_logprobs is not supported; leave it None (score prompts "
                              "with the patched model's forward instead)."),
}


@dataclass
class SamplingParams:
    """How one request generates (vLLM's field names and defaults).

    max_tokens: most new tokens. min_tokens: new tokens before an end-of-sequence token, a stop
    token id or a stop string may end the request (they are masked / not checked until then).
    temperature: 0 is greedy. top_p, top_k (-1 = off), min_p (0 = off): nucleus, top-k and
    min-p filtering. seed: per-request seed (same seed, same tokens, whatever else is batched).
    presence_penalty, frequency_penalty (in [-2, 2], over the generated tokens) and
    repetition_penalty (> 0, 1 = off, over prompt and generated tokens): vLLM's penalties,
    applied before greedy or sampled choice.
    stop: strings that end the output (not included unless ``include_stop_str_in_output``).
    stop_token_ids: token ids that end it. ignore_eos: keep going past the model's end-of-sequence
    token. skip_special_tokens: leave special tokens out of the text.
    n, best_of, logprobs, prompt_logprobs: accepted at their defaults only; ``check()`` refuses
    other values with one sentence each.

    Fields are checked by ``check()`` when a request is added, so one bad request fails alone.
    ``SamplingParams.of(value)`` also takes a dict of these fields.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @classmethod
    def of(cls, value: Any) -> "SamplingParams":
        """``value`` as ``SamplingParams``: itself, a dict of fields, or ``None`` (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(str(k) for k in value if k not in names)
            if unknown:
                raise InputError(f"SamplingParams has no field {unknown[0]!r}; use vLLM's names "
                                 f"({', '.join(sorted(names))}).")
            return cls(**value)
        raise InputError(f"sampling params must be SamplingParams or a dict of its fields, got {type(value).__name__}.")

    def check(self) -> None:
        """Raise ``InputError`` with one sentence for the first out-of-range or unsupported field."""
        def whole(name, value, minimum):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise InputError(f"SamplingParams.{name} must be a whole number >= {minimum}, got {value!r}.")

        def number(name, value, low, high, what):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low(value) or not high(value):
                raise InputError(f"SamplingParams.{name} must be {what}, got {value!r}.")

        for name, (default, sentence) in REFUSED.items():
            if getattr(self, name) != default:
                raise InputError(sentence)
        whole("max_tokens", self.max_tokens, 1)
        whole("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise InputError(f"SamplingParams.min_tokens ({self.min_tokens}) must be at most max_tokens "
                             f"({self.max_tokens}).")
        number("temperature", self.temperature, lambda v: v >= 0, lambda v: True, "a finite number >= 0")
        number("top_p", self.top_p, lambda v: v > 0, lambda v: v <= 1, "in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise InputError(f"SamplingParams.top_k must be -1 (off) or a whole number >= 1, got {self.top_k!r}.")
        number("min_p", self.min_p, lambda v: v >= 0, lambda v: v <= 1, "in [0, 1]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"SamplingParams.seed must be a whole number or None, got {self.seed!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            number(name, getattr(self, name), lambda v: v >= -2, lambda v: v <= 2, "in [-2, 2]")
        number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, lambda v: True,
               "a number > 0 (1 = off)")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None and (not isinstance(stops, (list, tuple))
                                  or not all(isinstance(s, str) and s for s in stops)):
            raise InputError(f"SamplingParams.stop must be non-empty strings, got {self.stop!r}.")
        if not isinstance(self.stop_token_ids, (list, tuple)) or \
                not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise InputError(f"SamplingParams.stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}.")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"SamplingParams.{name} must be True or False, got {getattr(self, name)!r}.")

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                   ending_ids: Iterable[int]) -> torch.Tensor:
    """``[V]`` logits after vLLM's penalties and ``min_tokens`` (fp32; returns ``logits`` itself when nothing applies).

    ``ending_ids``: the token ids that would end the request now (end-of-sequence unless ignored,
    ``stop_token_ids``); they are masked while fewer than ``min_tokens`` tokens are generated.
    """
    masked = len(output_ids) < params.min_tokens
    if not params.penalized and not masked:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted({t for t in prompt_ids + output_ids if t < vocab}), dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab].float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if masked:
        ids = [t for t in ending_ids if 0 <= t < vocab]
        if ids:
            logits[torch.tensor(ids, dtype=torch.long)] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token from ``[V]`` logits under ``params`` (fp32 math)."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > params.top_p            # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
