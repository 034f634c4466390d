"""Attention-drop profile: how much the loss would change if each attention entry were dropped.

For attention ``A`` (one row per query, softmax over keys) and its gradient ``G = dL/dA``, the
first-order loss change of dropping entry ``(i, j)`` and renormalising row ``i`` is (MoA)::

    E_ij = -A_ij (G_ij - sum_n A_in G_in) / (1 - A_ij)

The profiler sums ``|E|`` over ``block x block`` tiles and over the query heads of each GQA group,
giving per layer a ``[Hkv, nb, nb]`` map of how much each region of the causal attention matters.

Memory stays bounded: the profiler's attention (``capture.attention_override``) runs a custom autograd function
whose forward is plain causal sdpa that saves only ``q, k, v``; its backward recomputes ``A`` in
chunks of query rows, accumulates the ``|E|`` tiles and returns ``dq, dk, dv``. So one
forward + backward per sample profiles every layer while at most one chunk of one layer's
attention matrix exists at a time; gradient checkpointing bounds the rest of the activations.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..plan import ModelInfo
from .capture import attention_override
from .checkpointing import PROFILE_AUTO, CheckpointPolicy, checkpointing
from .optimize import band
from .store import Store, settings_key

logger = logging.getLogger("headwise")

# Elements of one [H, rows, kv] chunk of the recomputed attention (fp32: 32 MiB per temporary).
CHUNK_ELEMENTS = 8 * 1024 * 1024


class BlockRecorder:
    """Accumulates ``|E|`` per ``[layer, kv_head, query_block, key_block]`` (float64).

    Args:
        num_layers, num_kv_heads: model shape.
        length: sequence length ``N`` of the profiled samples.
        block: tile size in tokens (64 by default; 1 gives per-entry values, for tests).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, length: int, block: int = 64):
        self.block = block
        self.num_blocks = -(-length // block)
        shape = (num_layers, num_kv_heads, self.num_blocks, self.num_blocks)
        self.blocks = np.zeros(shape, dtype=np.float64)
        self.signed = np.zeros(shape, dtype=np.float64)
        self.bands: list[torch.Tensor | None] = [None] * num_layers

    def attend_as(self, plan, length: int) -> None:
        """Run every layer's attention as ``plan``'s heads do at ``length``: each head as softmax over
        the keys its ``kv_rule()`` keeps (banded), which is what the calibrator's candidates are.

        ``E`` is then taken at the plan instead of at the dense model: a kept entry records the
        loss change of dropping it, a dropped entry the loss change of leaving it out (minus the
        first-order change of adding it back).
        """
        from .kinds import candidate_kinds

        allowed = candidate_kinds()
        for layer, heads in enumerate(plan.layers):
            bands = []
            for head in heads:
                if head.kind not in allowed:
                    raise TypeError(f"profiling at a plan supports the calibrator's candidate kinds "
                                    f"({', '.join(allowed)}), not {head.kind!r}; profile at the dense model instead.")
                kept = band(head.kv_rule(), length)
                bands.append((length, length) if kept is None else kept)
            dense = all(span >= length for _, span in bands)
            self.bands[layer] = None if dense else torch.tensor(bands, dtype=torch.int64)

    def add(self, layer: int, row_start: int, e: torch.Tensor, group: int) -> None:
        """Add one row chunk of ``E``: ``e`` ``[H, rows, kv]`` for query rows starting at ``row_start``
        (a multiple of ``block``); query heads ``h*group .. (h+1)*group-1`` form KV head ``h``.

        ``blocks`` gets the tile sums of ``|E|``, ``signed`` the tile sums of ``E`` itself (the
        first-order loss change of dropping the whole tile of that KV head's group at once).
        """
        H, rows, kv = e.shape
        b = self.block
        pad_rows, pad_cols = -rows % b, -kv % b
        if pad_rows or pad_cols:
            e = F.pad(e, (0, pad_cols, 0, pad_rows))
        r0 = row_start // b
        for target, values in ((self.blocks, e.abs()), (self.signed, e)):
            tiles = values.reshape(H // group, group, (rows + pad_rows) // b, b, (kv + pad_cols) // b, b)
            tiles = tiles.sum(dim=(1, 3, 5), dtype=torch.float64)            # [Hkv, rb, kb]
            target[layer, :, r0:r0 + tiles.shape[1], :tiles.shape[2]] += tiles.cpu().numpy()


def _chunk_attention(q, k, scale, r0, bands, group):
    """Scores and kept-entry mask of query rows ``r0 .. r0 + rows`` against keys ``0 .. r1``.

    ``bands`` is ``None`` (every causal entry kept) or ``[Hkv, 2]`` int64 ``(sink, span)``: query
    ``i`` keeps key ``j <= i`` iff ``j < sink`` or ``j > i - span`` (the window kernels' rule).
    Returns ``scores`` ``[H, rows, r1]`` (future entries ``-inf``), ``logits`` (``scores`` with
    the dropped entries also ``-inf``: what the softmax takes), ``causal`` ``[rows, r1]`` and
    ``kept`` ``[H, rows, r1]`` bool (``None`` when every causal entry is kept).
    """
    rows, r1 = q.shape[-2], k.shape[-2]
    queries = torch.arange(r0, r0 + rows, device=q.device)[:, None]     # [rows, 1]
    keys = torch.arange(r1, device=q.device)[None, :]                  # [1, r1]
    causal = keys <= queries                                           # [rows, r1]
    scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~causal, float("-inf"))
    if bands is None:
        return scores, scores, causal, None
    sink = bands[:, 0].repeat_interleave(group)[:, None, None]          # [H, 1, 1]
    span = bands[:, 1].repeat_interleave(group)[:, None, None]
    kept = causal & ((keys < sink) | (keys > queries - span))          # [H, rows, r1]
    return scores, scores.masked_fill(~kept, float("-inf")), causal, kept


class _ProfiledCausalAttention(torch.autograd.Function):
    """Causal attention ``softmax(q k^T * scale) v`` whose backward also records ``E`` tiles.

    With ``bands`` (per KV head ``(sink, span)``) the attention is the plan's banded attention,
    and the recorded value of an entry the band drops is the loss change of *not* adding it back.
    """

    @staticmethod
    def forward(ctx, query, key, value, scale, layer_idx, recorder, bands):
        ctx.save_for_backward(query, key, value)
        ctx.scale, ctx.layer_idx, ctx.recorder, ctx.bands = scale, layer_idx, recorder, bands
        if bands is None:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                  enable_gqa=key.shape[1] != query.shape[1])
        B, H, T, D = query.shape
        group = H // key.shape[1]
        keys = key.repeat_interleave(group, dim=1)                           # [B, H, T, D]
        values = value.repeat_interleave(group, dim=1)
        out = torch.empty_like(query)
        rows = _rows_per_chunk(H, T, recorder.block)
        for b in range(B):
            for r0 in range(0, T, rows):
                r1 = min(T, r0 + rows)
                _, logits, _, _ = _chunk_attention(query[b, :, r0:r1], keys[b, :, :r1], scale, r0, bands, group)
                attn = torch.softmax(logits, dim=-1)
                out[b, :, r0:r1] = attn @ values[b, :, :r1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value = ctx.saved_tensors
        scale, recorder, bands = ctx.scale, ctx.recorder, ctx.bands
        B, H, T, D = query.shape
        group = H // key.shape[1]
        keys = key.repeat_interleave(group, dim=1)                           # [B, H, T, D]
        values = value.repeat_interleave(group, dim=1)
        grad_q = torch.zeros_like(query)
        grad_k = torch.zeros_like(keys)
        grad_v = torch.zeros_like(values)
        rows = _rows_per_chunk(H, T, recorder.block)
        for b in range(B):
            for r0 in range(0, T, rows):
                r1 = min(T, r0 + rows)
                q, k, v, dout = query[b, :, r0:r1], keys[b, :, :r1], values[b, :, :r1], grad_out[b, :, r0:r1]
                scores, logits, causal, kept = _chunk_attention(q, k, scale, r0, bands, group)  # [H, rows, r1]
                attn = torch.softmax(logits, dim=-1)
                grad_attn = dout @ v.transpose(-1, -2)                       # G = dL/dA
                row_dot = (attn * grad_attn).sum(-1, keepdim=True)
                grad_scores = attn * (grad_attn - row_dot)                   # A (G - sum_n A G)
                # E = -A (G - sum_n A G) / (1 - A); a row with a single key (A = 1) cannot drop it.
                e = -grad_scores / (1.0 - attn).clamp_min(1e-6)
                e = e.masked_fill(attn >= 1.0, 0.0)
                if kept is not None:
                    # a dropped entry j added back gets A'_j = p / (1 + p), p = exp(s_j) / Z_kept, and
                    # changes the loss by A'_j (G_j - sum_n A_n G_n); not adding it "costs" minus that
                    p = torch.exp(scores - torch.logsumexp(logits, dim=-1, keepdim=True))
                    added = -(p / (1.0 + p)) * (grad_attn - row_dot)
                    e = torch.where(kept, e, added.masked_fill(~causal, 0.0))
                    del p, added
                del scores, logits, grad_attn
                recorder.add(ctx.layer_idx, r0, e, group)
                del e
                grad_v[b, :, :r1] += attn.transpose(-1, -2) @ dout
                grad_q[b, :, r0:r1] = (grad_scores @ k) * scale
                grad_k[b, :, :r1] += (grad_scores.transpose(-1, -2) @ q) * scale
                del attn, grad_scores
        grad_k = grad_k.view(B, key.shape[1], group, T, D).sum(2)
        grad_v = grad_v.view(B, key.shape[1], group, T, D).sum(2)
        return grad_q, grad_k, grad_v, None, None, None, None


def _rows_per_chunk(heads: int, length: int, block: int) -> int:
    """Query rows per chunk so one ``[H, rows, T]`` fp32 temporary stays near ``CHUNK_ELEMENTS``."""
    return max(block, (CHUNK_ELEMENTS // max(1, heads * length)) // block * block)


def profiled_attention(recorder: BlockRecorder):
    """The profiler's attention function for ``capture.attention_override``: causal attention (the
    plan's bands when ``recorder.attend_as`` ran) whose backward records ``E`` into ``recorder``.

    The function takes ``query [B, H, T, D]``, ``key``/``value [B, Hkv, T, D]`` (no cache: a full
    causal prefill, ``prefill_only``) and returns ``(out [B, T, H, D], None)``.
    """
    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        bands = recorder.bands[module.layer_idx]
        out = _ProfiledCausalAttention.apply(query, key, value, scale, module.layer_idx, recorder,
                                             None if bands is None else bands.to(query.device))
        return out.transpose(1, 2).contiguous(), None

    return attention


def answer_loss(logits: torch.Tensor, input_ids: torch.Tensor, answer_start: int) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens ``input_ids[:, answer_start:]``.

    Args:
        logits: ``[B, T - answer_start + 1, V]``, the logits of the last positions (from the one
            predicting the first answer token); input_ids: ``[B, T]`` int64.
    """
    predicted = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), input_ids[:, answer_start:].reshape(-1))


def profile_sample(model, input_ids: torch.Tensor, answer_start: int, block: int = 64, plan=None,
                   checkpoint: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """One forward + backward of ``model`` on one sample, recording every layer's ``|E|`` tiles.

    Args:
        model: an unpatched ``transformers`` causal LM (Llama-style attention modules).
        input_ids: ``[1, T]`` int64, prompt followed by the answer tokens.
        answer_start: index of the first answer token; the loss is the answer's cross-entropy.
        block: tile size in tokens.
        plan: optional ``Plan`` of the calibrator's candidate heads to profile at (its banded attention runs in
            place of dense attention; see ``BlockRecorder.attend_as``); ``None`` profiles dense.
        checkpoint: run with gradient checkpointing (less memory, a second forward; the
            recorded tiles are the same).

    Returns:
        ``(blocks, signed, loss)``: ``blocks`` ``[layers, Hkv, nb, nb]`` float64 tile sums of ``|E|``
        with ``nb = ceil(T / block)``, ``signed`` the same shape with tile sums of ``E``; ``loss``
        the answer cross-entropy (nats per token).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"profile_sample takes input_ids of shape [1, T], got {tuple(input_ids.shape)}.")
    if not 0 < answer_start < input_ids.shape[1]:
        raise ValueError(f"answer_start {answer_start} must fall inside the sample of {input_ids.shape[1]} tokens.")
    config = model.config.get_text_config(decoder=True)
    num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    recorder = BlockRecorder(config.num_hidden_layers, num_kv, input_ids.shape[1], block)
    if plan is not None:
        plan.check_model(model)
        recorder.attend_as(plan, input_ids.shape[1])
    # only activations need gradients (frozen parameters): G flows, weight gradients are skipped
    with attention_override(model, profiled_attention(recorder), name="headwise_profile", freeze=True,
                            prefill_only=True), \
            checkpointing(model, checkpoint), torch.enable_grad():
        embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False,
                       logits_to_keep=input_ids.shape[1] - answer_start + 1).logits
        loss = answer_loss(logits, input_ids, answer_start)
        del logits
        loss.backward()
    return recorder.blocks, recorder.signed, float(loss.detach())


@dataclass
class LengthProfile:
    """Profile at one length, summed over ``samples`` samples: ``blocks`` ``[layers, Hkv, nb, nb]``
    float64 tile sums of ``|E|``; ``tiles`` the same shape, ``|sum of E over the tile|`` per sample
    (first-order loss change of dropping the whole tile); mean answer ``loss``; ``seconds`` spent."""

    length: int
    block: int
    blocks: np.ndarray
    tiles: np.ndarray
    samples: int
    loss: float
    seconds: float


class ProfileStore:
    """Profiles of one model on the calibration data, one npz file per (length, sample) in a
    ``store.Store``: a run that stops midway resumes where it left off, and two runs at different
    densities share one profile. Profiles taken at a plan live in a sub-folder named by its heads."""

    def __init__(self, model, root: str | os.PathLike | None = None, *, answer_tokens: int = 32, seed: int = 0,
                 block: int = 64, checkpoint: CheckpointPolicy = PROFILE_AUTO):
        from ..data.calibration import data_description

        self.info = ModelInfo.of(model)
        self.checkpoint = checkpoint     # which samples are profiled with gradient checkpointing
        self.answer_tokens, self.seed, self.block = answer_tokens, seed, block
        self.store = Store.of(root, self.info.fingerprint, "profile",
                              {"data": data_description(), "answer_tokens": answer_tokens, "seed": seed, "block": block})
        self.directory = self.store.directory

    def _at(self, plan):
        return self.store if plan is None else self.store.sub(f"at-{plan_key(plan)}")

    @staticmethod
    def _file(length: int, index: int) -> str:
        return f"L{length}-s{index:03d}.npz"

    def missing(self, lengths: list[int], samples: int, plan=None) -> list[tuple[int, int]]:
        store = self._at(plan)
        return [(n, i) for i in range(samples) for n in lengths if not store.has(self._file(n, i))]

    def collect(self, model, tokenizer, lengths: list[int], samples: int) -> dict[int, LengthProfile]:
        """Profile what is missing (progress bar with ETA), then return every length's profile."""
        from ..data.calibration import SampleBuilder

        todo = self.missing(lengths, samples)
        if todo:
            builder = SampleBuilder(model, tokenizer, self.answer_tokens, self.seed)
            offsets = {n: builder.offsets(n, samples) for n in lengths}
            self._profile(model, todo, lengths, lambda n, i: builder.build(n, i, offsets[n][i]), None)
        return {n: self.load(n, samples) for n in lengths}

    def collect_at(self, model, plan, lengths: list[int], samples: int) -> dict[int, LengthProfile]:
        """Profile the same samples as ``collect`` (which must have run) with ``plan``'s banded
        attention, for a refit: ``E`` linearised at the plan instead of at the dense model."""
        todo = self.missing(lengths, samples, plan)
        if todo:
            self._profile(model, todo, lengths, self._stored_sample, plan)
        return {n: self.load(n, samples, plan) for n in lengths}

    def _profile(self, model, todo: list[tuple[int, int]], lengths: list[int], sample_of, plan) -> None:
        """Profile and save every ``(length, index)`` in ``todo``; ``sample_of(length, index)``
        gives the sample. Work grows ~quadratically with length: the bar is weighted so its ETA
        means something."""
        from tqdm.auto import tqdm

        store = self._at(plan)
        weight = {n: (n / min(lengths)) ** 2 for n in lengths}
        bar = tqdm(total=sum(weight[n] for n, _ in todo), desc="profiling" if plan is None else "profiling at the plan",
                   unit="work", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}] {postfix}")
        for n, i in todo:
            bar.set_postfix_str(f"length {n} sample {i}")
            start = time.perf_counter()
            sample = sample_of(n, i)
            blocks, signed, loss = profile_sample(model, sample.input_ids, sample.answer_start, self.block, plan=plan,
                                                  checkpoint=self.checkpoint.wants(model, sample.input_ids.shape[1]))
            store.save_arrays(self._file(n, i), blocks=blocks, signed=signed, loss=np.float64(loss),
                              seconds=np.float64(time.perf_counter() - start), offset=np.int64(sample.offset),
                              answer_start=np.int64(sample.answer_start),
                              input_ids=sample.input_ids[0].cpu().numpy().astype(np.int64))
            bar.update(weight[n])
        bar.close()

    def _stored_sample(self, length: int, index: int) -> "_Stored":
        """The sample a dense profile file was taken on."""
        f = self.store.load_arrays(self._file(length, index))
        return _Stored(torch.from_numpy(f["input_ids"].astype(np.int64))[None], int(f["answer_start"]),
                       int(f["offset"]))

    def load(self, length: int, samples: int, plan=None) -> LengthProfile:
        """Sum of the first ``samples`` cached samples at ``length`` (taken at ``plan`` if given)."""
        store = self._at(plan)
        total, tiles, losses, seconds = 0.0, 0.0, [], 0.0
        for i in range(samples):
            f = store.load_arrays(self._file(length, i))
            total = total + f["blocks"].astype(np.float64)
            tiles = tiles + np.abs(f["signed"].astype(np.float64))
            losses.append(float(f["loss"]))
            seconds += float(f["seconds"])
        return LengthProfile(length, self.block, total, tiles, samples, float(np.mean(losses)), seconds)


def pooled(profiles: list[LengthProfile]) -> LengthProfile:
    """Profiles of one length taken at different points (dense model, plans), each scaled to unit
    total mass and summed, so every linearisation point weighs the same in the optimiser."""
    first = profiles[0]
    blocks = sum(p.blocks / p.blocks.sum() for p in profiles)
    tiles = sum(p.tiles / p.tiles.sum() for p in profiles)
    return LengthProfile(first.length, first.block, blocks, tiles, first.samples,
                         float(np.mean([p.loss for p in profiles])), sum(p.seconds for p in profiles))


@dataclass
class _Stored:
    """A calibration sample read back from a profile file (what ``_profile`` records of it)."""

    input_ids: torch.Tensor
    answer_start: int
    offset: int


def plan_key(plan) -> str:
    """Short digest of a plan's heads (not its calibration notes): names profiles taken at it."""
    return settings_key([[head.to_json() for head in layer] for layer in plan.layers])
