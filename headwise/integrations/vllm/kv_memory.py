"""Which KV blocks vLLM may give back for a layer whose KV heads all keep a sink and a window.

No vLLM import: the rule is plain arithmetic, tested without starting vLLM. ``kv_spec.py`` wraps it
in vLLM's KV cache spec and manager.

The plugin's span rule inside vLLM (``paged.py``): a query at position ``q`` of a step that ends at
length ``N`` reads, for each KV head ``h``, the keys ``k <= q`` with ``k < sink_h`` or
``k > q - span_h(N)``, ``span_h(N) = clamp(floor(alpha_h + beta_h * N), 1, N)``; a plan that prefills
dense has its prompt tokens read every key. One vLLM block holds every KV head of a layer, so a block
may go back to the pool only when no head of the layer can read it again: it lies outside
``[0, max_h sink_h)`` and before ``min_h`` of the window starts of every query still to come.

Which ``N``. After ``p`` tokens are processed (vLLM's "processed computed tokens": committed, safe
to free), every later query sits at some ``q >= p``:

* a decode token: ``N = q + 1``, window start ``q + 1 - span(q + 1)``. With ``0 <= beta <= 1`` this
  start never decreases as ``q`` grows, so its smallest value is at ``q = p``;
* a prompt token (plans that prefill by the plan): its chunk ends at ``N <= L`` (the prompt length)
  and ``N <= q + B`` (``B``: vLLM's token budget, ``max_num_batched_tokens``); a chunk ends past
  ``L`` only when vLLM recomputes a preempted request (its prompt plus its generated tokens), so
  ``N <= max(L, p + B)`` and the start ``q + 1 - span(N) >= p + 1 - span(max(L, p + B))``.

So while the prompt is not in (``p < L``), blocks wholly inside ``[sink, p + 1 - span(max(L, p +
B)))`` are never read again; once it is in, ``[sink, p + 1 - span(p + 1))`` (``span`` is the largest
over the layer's heads). A plan that prefills dense frees nothing before its prompt is in.

What the attention reads (``first_read``). vLLM frees a block only in its scheduler's copy of the
block table: the worker's copy keeps the freed block's id (it only ever appends ids), and the pool
may already have handed that block to another request or KV cache group. So the attention must not
read (nor write positions for) a freed entry, and it cannot tell which entries are freed: it nulls,
every step, the entries past the sink before ``first_read(c, N, prefilling)``, the first position
any query of the step reads (``c``: tokens before the step, ``N`` after it, ``prefilling``: ``c < L``,
vLLM's ``is_prefilling``). ``first_read >= first_kept`` for every step that follows a freeing
(``tests/integrations/test_kv_memory.py``), so every freed entry is nulled:

* prompt chunk (``c < L``) of a plan that prefills by the plan: ``c + 1 - span(N)``, its first
  query's window (``N <= c + B``, and ``x + 1 - span(x + B)`` does not decrease);
* prompt chunk of a plan that prefills dense: 0 (nothing nulled: nothing is freed before ``p >= L``);
* anything past the prompt (``c >= L``: a decode, or a recomputed chunk): ``c + 1 - span(c + 1)``,
  its first token's decode window. A recomputed chunk past the prompt thus reads its first token's
  decode window and what follows it, not every key nor the window of its chunk's length.

The final length (prompt + ``max_tokens``) is what DESIGN §2 names ``N`` when it is known, and it is
known to vLLM's scheduler; but vLLM 0.32 gives neither the attention backend nor the KV manager a
request's ``max_tokens`` (the manager sees request id, processed tokens and prompt length), so the
plugin keeps the current-length rule of ``patch_model`` without ``expected_length`` and frees by it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...kinds.base import HeadSpec
from ...kinds.rules import as_rule, span_of


@dataclass(frozen=True)
class LayerKeep:
    """What the KV heads of one (or several) all-window layers keep, for block freeing.

    Attributes:
        sink: the largest sink of the heads (tokens kept from position 0).
        windows: the distinct ``(alpha, beta, min_span)`` of the heads, sorted (``(alpha, beta)``:
            no span floor).
        prefill_dense: the plan prefills dense (prompt tokens read every key).
    """

    sink: int
    windows: tuple[tuple[float, ...], ...]
    prefill_dense: bool

    def span(self, n: int) -> int:
        """The largest span of the heads at length ``n`` (``n >= 1``)."""
        return max(span_of(alpha, beta, n, *floor) for alpha, beta, *floor in self.windows)

    def union(self, other: "LayerKeep") -> "LayerKeep":
        """What layers sharing one block table keep: the larger sink, every window."""
        if self.prefill_dense != other.prefill_dense:
            raise ValueError("layers of one plan share its prefill mode")
        return LayerKeep(max(self.sink, other.sink), tuple(sorted(set(self.windows) | set(other.windows))),
                         self.prefill_dense)

    def first_kept(self, processed: int, prompt_len: int, max_chunk: int = 1) -> int:
        """The first position past the sink that any query still to come may read.

        Args:
            processed: tokens processed and committed (``p`` in the module docstring).
            prompt_len: the request's prompt length ``L``.
            max_chunk: the most tokens one step computes for a request (vLLM's
                ``max_num_batched_tokens``, ``B``); 1 assumes no chunk ends past ``max(L, p + 1)``.

        Returns:
            ``p + 1 - span(max(L, p + B))`` while the prompt is not in, ``p + 1 - span(p + 1)`` once
            it is, clamped at 0 (module docstring); 0 while a dense-prefill plan's prompt is not in.
        """
        if processed <= 0 or (self.prefill_dense and processed < prompt_len):
            return 0
        n = processed + 1 if processed >= prompt_len else max(prompt_len, processed + max(1, max_chunk))
        return max(0, processed + 1 - self.span(n))

    def free_blocks(self, processed: int, prompt_len: int, block_size: int, max_chunk: int = 1) -> tuple[int, int]:
        """Logical blocks ``[first, last)`` of a request that no query still to come reads.

        ``first`` is the first block wholly past the sink, ``last`` the block holding the first kept
        position (``first_kept``); the range is empty when ``first >= last``.
        """
        return -(-self.sink // block_size), self.first_kept(processed, prompt_len, max_chunk) // block_size

    def first_read(self, context: int, length: int, prefilling: bool) -> int:
        """The first position past the sink any query of a step may read (module docstring).

        Args:
            context: the request's tokens before the step (``c``); length: after it (``N``).
            prefilling: ``context`` is inside the prompt (vLLM's ``is_prefilling``: ``c < L``).

        Returns:
            ``c + 1 - span(N)`` for a prompt chunk (0 for a plan that prefills dense), else
            ``c + 1 - span(c + 1)``; clamped at 0.
        """
        if prefilling and self.prefill_dense:
            return 0
        return max(0, context + 1 - self.span(length if prefilling else context + 1))

    def unread_blocks(self, context: int, length: int, prefilling: bool, block_size: int) -> tuple[int, int]:
        """Logical blocks ``[first, last)`` no query of the step reads: past the sink blocks, before the block
        of ``first_read``; every block ``free_blocks`` may have freed lies in it."""
        return -(-self.sink // block_size), self.first_read(context, length, prefilling) // block_size


def layer_keep(heads: tuple[HeadSpec, ...], prefill_dense: bool) -> LayerKeep | None:
    """The ``LayerKeep`` of a layer's KV heads, or ``None`` when a head reads every key (dense).

    Reads the heads through ``HeadSpec.kv_rule()`` (``(sink, alpha, beta, dense[, min_span])``), so any kind that
    keeps a sink and a window qualifies; the plugin's allow-list (``plan_source.check_runnable``)
    decides which kinds reach here.
    """
    rules = [as_rule(h.kv_rule()) for h in heads]
    if not rules or any(r.dense for r in rules):
        return None
    return LayerKeep(max(r.sink for r in rules),
                     tuple(sorted({(float(r.alpha), float(r.beta), *([int(r.min_span)] if r.min_span else []))
                                   for r in rules})), prefill_dense)
