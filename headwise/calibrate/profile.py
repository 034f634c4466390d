"""Attention-drop profile: how much the loss would change if each attention entry were dropped.

For attention ``A`` (one row per query, softmax over keys) and its gradient ``G = dL/dA``, the
first-order loss change of dropping entry ``(i, j)`` and renormalising row ``i`` is (MoA)::

    E_ij = -A_ij (G_ij - sum_n A_in G_in) / (1 - A_ij)

The profiler sums ``|E|`` over ``block x block`` tiles and over the query heads of each GQA group,
giving per layer a ``[Hkv, nb, nb]`` map of how much each region of the causal attention matters.

Memory stays bounded: the "headwise_profile" attention function runs a custom autograd function
whose forward is plain causal sdpa that saves only ``q, k, v``; its backward recomputes ``A`` in
chunks of query rows, accumulates the ``|E|`` tiles and returns ``dq, dk, dv``. So one
forward + backward per sample profiles every layer while at most one chunk of one layer's
attention matrix exists at a time; gradient checkpointing bounds the rest of the activations.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn.functional as F

from .checkpointing import checkpointing

logger = logging.getLogger("headwise")

NAME = "headwise_profile"
# Elements of one [H, rows, kv] chunk of the recomputed attention (fp32: 32 MiB per temporary).
CHUNK_ELEMENTS = 8 * 1024 * 1024

_ACTIVE: "BlockRecorder | None" = None


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
        """Run every layer's attention as ``plan``'s heads do at ``length`` (window heads banded).

        ``E`` is then taken at the plan instead of at the dense model: a kept entry records the
        loss change of dropping it, a dropped entry the loss change of leaving it out (minus the
        first-order change of adding it back).
        """
        from ..kinds.dense import Dense
        from ..kinds.window import Window

        for layer, heads in enumerate(plan.layers):
            bands = []
            for head in heads:
                if isinstance(head, Dense) or head.kept(length) >= length:
                    bands.append((length, length))
                elif isinstance(head, Window):
                    bands.append((head.sink, head.span(length)))
                else:
                    raise TypeError(f"profiling at a plan supports window and dense heads, not {head.kind!r}; "
                                    "profile at the dense model instead.")
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


def profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention-interface function "headwise_profile" (active only inside ``profiling``).

    Args:
        query: ``[B, H, T, D]``; key, value: ``[B, Hkv, T, D]`` (no cache: a full causal prefill).

    Returns:
        ``(out [B, T, H, D], None)``.
    """
    if _ACTIVE is None:
        raise RuntimeError("headwise_profile attention ran outside headwise.calibrate.profile.profiling(); "
                           "use profile_sample() instead of selecting it by hand.")
    if query.shape[-2] != key.shape[-2]:
        raise ValueError("the profiling attention needs a full causal forward without a cache; call the model with "
                         "use_cache=False.")
    if dropout:
        raise ValueError("the profiling attention does not implement dropout; set the model's attention_dropout to 0.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bands = _ACTIVE.bands[module.layer_idx]
    out = _ProfiledCausalAttention.apply(query, key, value, scale, module.layer_idx, _ACTIVE,
                                         None if bands is None else bands.to(query.device))
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """Mask-interface function for "headwise_profile": attention is causal by construction."""
    return None


@contextlib.contextmanager
def profiling(model, recorder: BlockRecorder):
    """Route ``model``'s attention through the profiler while inside.

    The previous attention implementation is restored on exit, also after an error. Gradient
    checkpointing is the caller's choice (``checkpointing.checkpointing``).
    """
    global _ACTIVE
    from transformers import AttentionInterface, AttentionMaskInterface

    if getattr(model, "_headwise", None) is not None:
        raise RuntimeError("profile the unpatched model; call unpatch_model(model) first.")
    AttentionInterface.register(NAME, profile_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    _ACTIVE = recorder
    try:
        yield recorder
    finally:
        _ACTIVE = None
        model.set_attn_implementation(previous or "sdpa")


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
        plan: optional ``Plan`` of window/dense heads to profile at (its banded attention runs in
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
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)      # only activations need gradients: G flows, weight grads are skipped
    try:
        with profiling(model, recorder), checkpointing(model, checkpoint), torch.enable_grad():
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False, 
                           logits_to_keep=input_ids.shape[1] - answer_start + 1).logits
            loss = answer_loss(logits, input_ids, answer_start)
            del logits
            loss.backward()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
    return recorder.blocks, recorder.signed, float(loss.detach())
