"""A request as the engine tracks it, and the vLLM-shaped outputs it turns into."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from ..plan import Plan
from .layout import head_layout
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class CompletionOutput:
    """One generated continuation (vLLM's ``CompletionOutput``)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None       # "stop", "length", "error" or None while running
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt (vLLM's ``RequestOutput``).

    ``error`` holds the one-sentence reason when the request failed alone; ``kv`` its KV use at
    its peak: blocks and bytes held per head kind, and what a dense cache would hold.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    kv: dict = field(default_factory=dict)


_ids = itertools.count()


class Sequence:
    """One request: its tokens, its target length ``N``, and its per-(layer, KV head) block tables.

    ``table[l, h, j]`` is the pool block holding logical block ``j`` of KV head ``h`` in layer ``l``
    (-1 while unallocated); ``nblocks[l, h]`` how many it holds. Layout tensors (``sink``, ``span``,
    ``sink_slots``, ``ring``, ``max_blocks``: ``[L, Hkv]`` int64) come from the head kinds, see
    ``engine.layout.HeadLayout``.
    """

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, plan: Plan, block_size: int,
                 max_length: int, prompt: str | None = None, request_id: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0              # tokens whose KV is in the pool
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""                    # the output text so far (cut at a stop string)
        self.streamed = 0                 # characters of ``text`` already given out by ``LLM.stream``
        self.detokenizer = None           # an ``IncrementalDetokenizer`` when the engine has a tokenizer
        self.error: str | None = None
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        # N: the length this request will reach, which sizes elastic spans (docs/design.md, "The plan").
        self.target_length = min(len(self.prompt_token_ids) + params.max_tokens, max_length)
        layouts = [[head_layout(spec, self.target_length, block_size) for spec in layer]
                   for layer in plan.layers]
        self.kinds = [[spec.kind for spec in layer] for layer in plan.layers]

        def grid(name):
            return torch.tensor([[getattr(x, name) for x in layer] for layer in layouts], dtype=torch.long)

        self.sink, self.span, self.sink_slots, self.ring, self.max_blocks = (
            grid(n) for n in ("sink", "span", "sink_slots", "ring", "max_blocks"))
        self.keeps_kv = grid("keeps_kv").bool()             # [L, Hkv] False: a recurrent-state head
        self.all_keep_kv = bool(self.keeps_kv.all())
        # recurrent states of the head groups that keep no KV: (layer, first head) -> tensor
        self.states: dict[tuple[int, int], torch.Tensor] = {}
        self.table = torch.full((*self.max_blocks.shape, max(1, int(self.max_blocks.max()))), -1, dtype=torch.int32)
        self.nblocks = torch.zeros_like(self.max_blocks)
        self.peak_blocks = 0
        self.peak_blocks_by_kind: dict[str, int] = {}
        self._kind_masks = {k: torch.tensor([[x == k for x in layer] for layer in self.kinds])
                            for k in {x for layer in self.kinds for x in layer}}

    def note_blocks(self) -> None:
        """Record the blocks held now if they are this request's peak (per head kind too)."""
        held = int(self.nblocks.sum())
        if held > self.peak_blocks:
            self.peak_blocks = held
            self.peak_blocks_by_kind = {k: int(self.nblocks[m].sum()) for k, m in self._kind_masks.items()}

    # ---- tokens ---------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def uncomputed(self) -> int:
        """Tokens whose KV is not in the pool yet (the prompt, or all tokens after a preemption)."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """One new token on top of a computed context: the next step is a decode step."""
        return self.num_computed > 0 and self.uncomputed == 1

    # ---- layout ---------------------------------------------------------------------------------
    def logical_slots(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n]`` positions -> ``[L, Hkv, n]`` logical slots (see ``engine.layout.HeadLayout``)."""
        p = positions[None, None, :]
        sink = self.sink[..., None]
        ring = self.ring[..., None]
        offset = p - sink
        wrapped = torch.where(ring > 0, offset % ring.clamp(min=1), offset)
        return torch.where(p < sink, p, self.sink_slots[..., None] + wrapped)

    def blocks_needed_upto(self, last_position: int, block_size: int) -> torch.Tensor:
        """``[L, Hkv]`` blocks each head needs once position ``last_position`` is stored."""
        p = torch.tensor(last_position)
        unwrapped = torch.where(p < self.sink, p, self.sink_slots + p - self.sink)
        return torch.minimum(unwrapped // block_size + 1, self.max_blocks)
