"""DuoAttention-style gates: which KV heads must see far context, measured by their joint effect.

Every KV head ``h`` of every layer gets a gate ``a_h in [0, 1]`` mixing its two possible outputs::

    out_h = a_h * full_h + (1 - a_h) * local_h

``full_h`` is causal attention over every earlier token, ``local_h`` attention over the first
``sink`` tokens plus the last ``window`` tokens (the query included; the kernels' rule: key ``j``
is read iff ``j < sink`` or ``j > i - window``). With the model frozen, only the gates train, all
at once, on long-range recall samples: the loss is the distance of the gated model's final hidden
states at the answer positions from the dense model's (cached once per sample), plus an L1 penalty
pulling every gate to 0. A head the answers need keeps its gate up *given what the other heads
do*, so heads that carry a fact jointly are all kept, which a per-entry first-order score at the
dense model under-counts. Gates are clipped to ``[0, 1]`` after every step (projected Adam, as in
DuoAttention), so a gate at 0 can come back.

Memory: the local branch is computed block-wise (``O(T * (sink + 2 * window))`` per head), the
full branch by torch's causal sdpa; long samples run with gradient checkpointing, which keeps
one layer's intermediates alive at a time (``checkpointing.CheckpointPolicy``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..plan import ModelInfo
from .capture import attention_override
from .checkpointing import GATES_AUTO, CheckpointPolicy, checkpointing
from .select import ranked
from .store import Store, settings_key

logger = logging.getLogger("headwise")


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int,
                    scale: float) -> torch.Tensor:
    """Sink + window causal attention with autograd, ``O(T * (sink + 2 * window))`` memory.

    Query ``i`` reads key ``j <= i`` iff ``j < sink`` or ``j > i - window`` (the sink_window
    kernels' rule with ``span = window``).

    Args:
        q, k, v: ``[B, H, T, D]`` (key/value heads already expanded to the query heads).
        sink: leading tokens every query reads (>= 0); window: local span (>= 1).
        scale: softmax scale.

    Returns:
        ``[B, H, T, D]``.
    """
    if window < 1 or sink < 0:
        raise ValueError(f"local attention needs window >= 1 and sink >= 0, got window {window} and sink {sink}.")
    B, H, T, D = q.shape
    W = window
    nb = -(-T // W)
    pad = nb * W - T
    qb = F.pad(q, (0, 0, 0, pad)).reshape(B, H, nb, W, D)
    kb = F.pad(k, (0, 0, W, pad)).unfold(2, 2 * W, W).transpose(-1, -2)        # [B, H, nb, 2W, D]
    vb = F.pad(v, (0, 0, W, pad)).unfold(2, 2 * W, W).transpose(-1, -2)
    i = torch.arange(nb * W, device=q.device).view(nb, W, 1)                     # query positions
    j = (torch.arange(nb, device=q.device).view(nb, 1, 1) - 1) * W + torch.arange(2 * W, device=q.device)
    band_ok = (j <= i) & (j > i - W) & (j >= max(sink, 0))                      # [nb, W, 2W]
    scores = (qb @ kb.transpose(-1, -2)) * scale                                 # [B, H, nb, W, 2W]
    scores = scores.masked_fill(~band_ok, float("-inf"))
    S = min(sink, T)
    if S:
        ks, vs = k[:, :, :S], v[:, :, :S]
        sink_scores = (qb @ ks[:, :, None].transpose(-1, -2)) * scale            # [B, H, nb, W, S]
        sink_ok = torch.arange(S, device=q.device) <= i                          # [nb, W, S]
        scores = torch.cat([sink_scores.masked_fill(~sink_ok, float("-inf")), scores], dim=-1)
    attn = torch.softmax(scores, dim=-1)
    out = attn[..., S:] @ vb
    if S:
        out = out + attn[..., :S] @ vs[:, :, None]
    return out.reshape(B, H, nb * W, D)[:, :, :T]


@dataclass
class GateState:
    """The trainable gates ``[layers, Hkv]`` and the local branch's shape, while gating is on."""

    gates: torch.nn.Parameter
    sink: int
    window: int
    fixed: torch.Tensor | None = None     # [layers, Hkv] float: gates used as-is (no training), or None


def gated_attention(state: GateState):
    """The gates' attention function for ``capture.attention_override``: per KV head
    ``a * full + (1 - a) * local``, ``a`` from ``state`` (its fixed gates when set).

    The function takes ``query [B, H, T, D]``, ``key``/``value [B, Hkv, T, D]`` (no cache, no
    padding: ``prefill_only``) and returns ``(out [B, T, H, D], None)``.
    """
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        group = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(group, dim=1)
        v = value.repeat_interleave(group, dim=1)
        full = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)
        local = local_attention(query, k, v, state.sink, state.window, scale)
        source = state.fixed if state.fixed is not None else state.gates
        a = source[module.layer_idx].to(query.dtype).repeat_interleave(group)[None, :, None, None]
        out = local + a * (full - local)
        return out.transpose(1, 2).contiguous(), None

    return attention


@contextlib.contextmanager
def gating(model, state: GateState):
    """Route ``model``'s attention through the gated mix while inside, model frozen
    (``capture.attention_override``: attention implementation and ``requires_grad`` flags are
    restored on exit, also after an error). Gradient checkpointing is the caller's choice
    (``checkpointing.checkpointing``)."""
    with attention_override(model, gated_attention(state), name="headwise_gates", freeze=True, prefill_only=True):
        yield state


def final_hidden(model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states at ``positions``.

    Args:
        input_ids: ``[1, T]`` int64; positions: ``[P]`` int64.

    Returns:
        ``[P, hidden]`` (float32).
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    embeds = model.get_input_embeddings()(input_ids)
    hidden = decoder(inputs_embeds=embeds, use_cache=False).last_hidden_state
    return hidden[0, positions].float()


@torch.no_grad()
def dense_targets(model, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The unmodified model's final hidden states at ``positions`` (``[P, hidden]`` float32): the
    distillation targets. Computed with the model's own attention implementation."""
    return final_hidden(model, input_ids, positions)


@dataclass
class GateSample:
    """One training sample: ``input_ids`` ``[1, T]``, ``positions`` ``[P]`` whose final hidden
    states are matched, and ``target`` ``[P, hidden]`` (the dense model's, float32)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    target: torch.Tensor


@dataclass
class GateResult:
    """Trained gates ``[layers, Hkv]`` (float64, in ``[0, 1]``), the mean gradient of the
    distillation loss w.r.t. each gate over training (``importance``, >= 0 means lowering the
    gate hurt), and the per-step log."""

    gates: np.ndarray
    importance: np.ndarray
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def ranking(self) -> list[tuple[int, int]]:
        """KV heads ``(layer, head)`` from most to least needed: by gate (to 6 decimals), ties by
        importance, then by ``(layer, head)``."""
        L, H = self.gates.shape
        return ranked({(l, h): (round(float(self.gates[l, h]), 6), float(self.importance[l, h]))
                       for l in range(L) for h in range(H)}, highest=True)


def distill_loss(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum ||hidden - target||^2 / sum ||target||^2`` over the matched positions (scale-free)."""
    return ((hidden - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-12)


def train_gates(model, samples: list[GateSample], *, sink: int = 64, window: int = 256, steps: int = 32,
                lr: float = 0.05, l1: float = 0.05, seed: int = 0, progress=None,
                checkpoint: CheckpointPolicy = GATES_AUTO) -> GateResult:
    """Train one gate per KV head against the dense model's hidden states, model frozen.

    Each step takes one sample (cycling through ``samples`` in a seeded order) and minimises
    ``distill_loss + l1 * mean(gates)`` with Adam; gates start at 1 and are clipped to ``[0, 1]``.

    Args:
        samples: training samples with cached dense targets (``GateSample``).
        sink, window: the local branch (sink tokens + window span).
        steps: optimiser steps; lr: Adam learning rate; l1: weight of the mean gate.
        seed: orders the samples.
        progress: optional ``callable(step, record)`` (e.g. a tqdm update).
        checkpoint: which steps run with gradient checkpointing (by sample length and free
            memory); it trades time for memory and changes no gate.

    Returns:
        ``GateResult``; deterministic for a given model, samples and arguments.
    """
    if not samples:
        raise ValueError("train_gates needs at least one sample; build calibration samples first.")
    config = model.config.get_text_config(decoder=True)
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    gates = torch.nn.Parameter(torch.ones(layers, kv_heads, dtype=torch.float32))
    optimizer = torch.optim.Adam([gates], lr=lr)
    order = list(range(len(samples)))
    rng = random.Random(seed)
    state = GateState(gates, sink, window)
    grad_sum = torch.zeros(layers, kv_heads, dtype=torch.float64)
    history = []
    started = time.perf_counter()
    with gating(model, state), torch.enable_grad():
        for step in range(steps):
            if step % len(order) == 0:
                rng.shuffle(order)
            sample = samples[order[step % len(order)]]
            optimizer.zero_grad()
            with checkpointing(model, checkpoint.wants(model, sample.input_ids.shape[1])):
                hidden = final_hidden(model, sample.input_ids, sample.positions)
                distill = distill_loss(hidden, sample.target)
                distill.backward(retain_graph=False)
            grad_sum -= gates.grad.double()          # d(distill)/d(a) < 0: the head is needed
            with torch.no_grad():
                gates.grad += l1 / gates.numel()
            optimizer.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            record = {"step": step, "length": int(sample.input_ids.shape[1]), "distill": float(distill.detach()),
                      "mean_gate": float(gates.detach().mean()), "gates_above_half": int((gates.detach() > 0.5).sum())}
            history.append(record)
            logger.info("headwise gates: %s", record)
            if progress is not None:
                progress(step, record)
    return GateResult(gates.detach().double().numpy(), (grad_sum / steps).numpy(), history,
                      time.perf_counter() - started)


@torch.no_grad()
def gated_loss(model, samples: list[GateSample], gates: np.ndarray, *, sink: int = 64, window: int = 256) -> float:
    """Mean ``distill_loss`` over ``samples`` with the gates fixed to ``gates`` ``[layers, Hkv]``
    (e.g. 0/1: which heads are long), no training."""
    state = GateState(torch.nn.Parameter(torch.zeros(1)), sink, window, torch.as_tensor(gates, dtype=torch.float32))
    with gating(model, state):
        losses = [float(distill_loss(final_hidden(model, s.input_ids, s.positions), s.target)) for s in samples]
    return float(np.mean(losses))


@dataclass(frozen=True)
class GateSettings:
    """Everything that decides trained gates besides the model and data."""

    lengths: tuple[int, ...]
    samples: int
    steps: int
    lr: float
    l1: float
    sink: int
    window: int
    seed: int

    def key(self) -> str:
        return settings_key(asdict(self))


class GateStore:
    """Gate-training samples with their dense targets, and trained gates, of one model on one recall
    data set (``data.recall``), in a ``store.Store``: ``L<length>-s<index>.npz`` (``input_ids``,
    ``positions``, ``target``, ``depths``) and ``gates-<settings>.npz`` (``gates``, ``importance``,
    ``history`` as JSON text). A second calibration at another density reuses both and only re-solves."""

    def __init__(self, model, root: str | os.PathLike | None = None, *, facts: int = 8, seed: int = 0,
                 checkpoint: CheckpointPolicy = GATES_AUTO):
        from ..data.recall import recall_description

        self.info = ModelInfo.of(model)
        self.checkpoint = checkpoint     # which training steps run with gradient checkpointing
        self.facts, self.seed = facts, seed
        self.store = Store.of(root, self.info.fingerprint, "gates", {"data": recall_description(facts), "seed": seed})
        self.directory = self.store.directory

    @staticmethod
    def _sample_file(length: int, index: int) -> str:
        return f"L{length}-s{index:03d}.npz"

    def samples(self, model, tokenizer, lengths: list[int], count: int) -> list[GateSample]:
        """``count`` samples per length with dense targets, computing (and caching) what is missing."""
        from tqdm.auto import tqdm

        from ..data.recall import RecallBuilder

        todo = [(n, i) for n in lengths for i in range(count) if not self.store.has(self._sample_file(n, i))]
        if todo:
            builder = RecallBuilder(tokenizer, self.facts, self.seed)
            for n, i in tqdm(todo, desc="dense targets", unit="sample"):
                s = builder.build(n, i)
                target = dense_targets(model, s.input_ids.to(model.device), s.positions.to(model.device))
                self.store.save_arrays(self._sample_file(n, i), input_ids=s.input_ids[0].numpy().astype(np.int64),
                                       positions=s.positions.numpy().astype(np.int64),
                                       target=target.cpu().numpy().astype(np.float32),
                                       depths=np.array(s.depths, dtype=np.float64))
        out = []
        for n in lengths:
            for i in range(count):
                f = self.store.load_arrays(self._sample_file(n, i))
                out.append(GateSample(torch.from_numpy(f["input_ids"])[None].to(model.device),
                                      torch.from_numpy(f["positions"]).to(model.device),
                                      torch.from_numpy(f["target"]).to(model.device)))
        return out

    def gates_path(self, settings: GateSettings):
        return self.store.path(f"gates-{settings.key()}.npz")

    def gates(self, model, tokenizer, settings: GateSettings) -> tuple[GateResult, bool]:
        """Trained gates for ``settings`` (loaded when cached). Returns ``(result, computed_now)``."""
        from tqdm.auto import tqdm

        file = self.gates_path(settings).name
        if self.store.has(file):
            f = self.store.load_arrays(file)
            return GateResult(f["gates"], f["importance"], json.loads(str(f["history"])), float(f["seconds"])), False
        started = time.perf_counter()
        samples = self.samples(model, tokenizer, list(settings.lengths), settings.samples)
        targets_seconds = time.perf_counter() - started
        bar = tqdm(total=settings.steps, desc="training gates", unit="step")

        def progress(step, record):
            bar.set_postfix_str(f"L={record['length']} distill={record['distill']:.2e} "
                                f"gates>0.5={record['gates_above_half']}")
            bar.update()

        result = train_gates(model, samples, sink=settings.sink, window=settings.window, steps=settings.steps,
                             lr=settings.lr, l1=settings.l1, seed=settings.seed, progress=progress,
                             checkpoint=self.checkpoint)
        bar.close()
        result.seconds += targets_seconds
        self.store.save_arrays(file, compressed=False, gates=result.gates, importance=result.importance,
                               history=np.array(json.dumps(result.history)), seconds=np.float64(result.seconds),
                               settings=np.array(json.dumps(asdict(settings))))
        return result, True
