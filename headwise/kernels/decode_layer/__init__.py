"""``decode_layer`` op: a Llama-family decoder layer for the few token rows of a decode step.

``naive`` is the torch reference (fp32 math, fp32/bf16 weights and pools); ``native`` runs it in C
(``decode_layer.c``, built on first use): ``native.DecodeLayers(dims, layers).run(...)`` executes a
decode-only step's layers (norm, QKV, RoPE, KV write, paged attention, O projection, MLP) in one
call, ``.pre`` / ``.post`` split a layer around attention that runs elsewhere. The engine's lean
decode forward (``engine.lean``) uses it and logs which path ran.
"""

from __future__ import annotations

from . import naive, native
from .naive import Dims, LayerWeights

__all__ = ["Dims", "LayerWeights", "naive", "native"]
