"""Gradient checkpointing for the calibrator's forward + backward passes, by sample length.

Checkpointing keeps one layer's activations alive at a time and pays for it with a second
forward in the backward. The gradients are bit-identical either way (the recomputation runs the
same CPU ops), so the choice is memory against time only. Measured on the embedded SmolLM2-135M,
2 threads (2026-11-27, ``/tmp`` script timing one pass):

- gate training step (``gates.train_gates``): 2048 tokens 53.6 s with checkpointing, 38.7 s
  without; 4096 tokens 133 s (peak RSS 3.0 GiB) against 109 s (11.6 GiB). Default: checkpoint above
  2048 tokens.
- profile sample (``profile.profile_sample``, whose attention saves only q/k/v): 4096 tokens
  131 s with checkpointing (2.9 GiB) against 116 s without (5.5 GiB). Default: checkpoint above
  4096 tokens.

Both defaults also checkpoint whenever the estimated activations would not fit in half the
available memory (``CheckpointPolicy.memory_guard``), which a larger model reaches at fewer tokens.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

GATES_CHECKPOINT_ABOVE = 2048
"""Default for gate training: samples of more tokens than this run with gradient checkpointing."""

PROFILE_CHECKPOINT_ABOVE = 4096
"""Default for profiling: samples of more tokens than this run with gradient checkpointing."""

POLICIES = ("auto", "always", "never")


def activation_bytes(model, tokens: int) -> int:
    """Rough size of what one forward + backward keeps without checkpointing: per token and layer
    16 hidden-size and 6 intermediate-size fp32 vectors (fitted to the gate step above: 2.1 MiB
    per token on SmolLM2-135M, 4.5 GiB at 2k and 8.6 GiB at 4k over the checkpointed run)."""
    config = model.config.get_text_config(decoder=True)
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return int(tokens) * config.num_hidden_layers * (16 * hidden + 6 * intermediate) * 4


def available_bytes() -> int | None:
    """Memory the OS can still give this process (``MemAvailable`` on Linux, else free pages), or
    ``None`` when it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a calibration pass over ``tokens`` tokens runs with gradient checkpointing.

    ``above``: checkpoint samples longer than this many tokens (``0``: all, ``None``: none by
    length). ``memory_guard``: also checkpoint when ``activation_bytes`` exceeds half the memory
    still available (or that cannot be read), so ``auto`` stays safe on larger models.
    """

    above: int | None
    memory_guard: bool = True

    def __post_init__(self):
        if self.above is not None and self.above < 0:
            raise ValueError(f"checkpoint threshold must be >= 0 tokens or None (never), got {self.above}.")

    def wants(self, model, tokens: int) -> bool:
        if self.above is not None and tokens > self.above:
            return True
        if not self.memory_guard:
            return False
        free = available_bytes()
        return free is None or activation_bytes(model, tokens) > free // 2

    @classmethod
    def named(cls, name: str, auto_above: int) -> "CheckpointPolicy":
        """``auto`` (checkpoint above ``auto_above`` tokens or when memory is short), ``always`` or
        ``never``."""
        if name not in POLICIES:
            raise ValueError(f"unknown checkpointing policy {name!r}; use one of {', '.join(POLICIES)}.")
        return {"auto": cls(auto_above), "always": cls(0, False), "never": cls(None, False)}[name]


GATES_AUTO = CheckpointPolicy(GATES_CHECKPOINT_ABOVE)
PROFILE_AUTO = CheckpointPolicy(PROFILE_CHECKPOINT_ABOVE)


@contextlib.contextmanager
def checkpointing(model, enabled: bool):
    """Turn on ``model``'s gradient checkpointing (and training mode, which transformers needs for
    it) while inside when ``enabled``; train/eval mode and checkpointing are restored on exit,
    also after an error. A model already checkpointing, or one that cannot, is left as it is."""
    was_training = model.training
    use = enabled and not getattr(model, "is_gradient_checkpointing", False) \
        and getattr(model, "supports_gradient_checkpointing", False)
    if use:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()   # the calibrator's attention functions reject dropout, so training mode adds none
    try:
        yield use
    finally:
        if use:
            model.gradient_checkpointing_disable()
        model.train(was_training)
