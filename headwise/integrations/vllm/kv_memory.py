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
* a prompt token (plans that prefill by the plan): its chunk ends at ``N <= L`` (the prompt length;
  a prompt chunk never ends past the prompt), so its start ``q + 1 - span(N) >= p + 1 - span(L)``.

So blocks wholly inside ``[sink, p + 1 - span(N*))``, ``N* = max(L, p + 1)``, are never read again
(``span`` is the largest over the layer's heads). A plan that prefills dense frees nothing before its
prompt is in (``p >= L``); from then on ``N* = p + 1``. A request vLLM preempts and recomputes
re-reads its generated tokens as a prompt chunk past ``L``: such a chunk reads the keys still held
(freed blocks are masked), not every key.

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

    def first_kept(self, processed: int, prompt_len: int) -> int:
        """The first position past the sink that any query still to come may read.

        Args:
            processed: tokens processed and committed (``p`` in the module docstring).
            prompt_len: the request's prompt length ``L``.

        Returns:
            ``p + 1 - span(N*)`` clamped at 0 (module docstring); 0 while a dense-prefill plan's
            prompt is not in.
        """
        if processed <= 0 or (self.prefill_dense and processed < prompt_len):
            return 0
        n = processed + 1 if self.prefill_dense else max(prompt_len, processed + 1)
        return max(0, processed + 1 - self.span(n))

    def free_blocks(self, processed: int, prompt_len: int, block_size: int) -> tuple[int, int]:
        """Logical blocks ``[first, last)`` of a request that no query still to come reads.

        ``first`` is the first block wholly past the sink, ``last`` the block holding the first kept
        position; the range is empty when ``first >= last``.
        """
        return -(-self.sink // block_size), self.first_kept(processed, prompt_len) // block_size


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
