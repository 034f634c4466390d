"""``LLM``: the engine's front door, shaped like vLLM's (``generate``, ``SamplingParams``, outputs)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..errors import InputError
from ..plan import PREFILL_MODES, Plan
from .block_manager import BlockManager, pool_size
from .config import EngineConfig
from .detokenize import IncrementalDetokenizer
from .runner import ModelRunner
from .sampling import SamplingParams, process_logits, sample
from .scheduler import Scheduler
from .sequence import CompletionOutput, RequestOutput, Sequence, Status

logger = logging.getLogger("headwise.engine")


@dataclass
class EngineStats:
    """What the last ``generate``/``stream`` call did.

    prefill_seconds: wall time of steps that ran any prefill token; decode_seconds: of steps that
    ran only decode tokens (``decode_steps`` of them, ``decode_tokens`` tokens).
    peak_kv_bytes: KV pool bytes held at the peak (whole blocks); dense_kv_bytes: the peak a dense
    cache would hold for the tokens in flight; both count whole blocks (a dense head holds
    ceil(tokens / block_size) blocks), the way the pool allocates; kv_bytes_by_kind: the held peak
    split by head kind.
    peak_blocks / num_blocks: pool blocks at the peak / in the pool. peak_state_bytes: the peak of the
    recurrent states (lightning heads) held by running requests, outside the pool.
    """

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    prefill_tokens: int = 0
    peak_kv_bytes: int = 0
    dense_kv_bytes: int = 0
    kv_bytes_by_kind: dict = field(default_factory=dict)
    peak_blocks: int = 0
    num_blocks: int = 0
    peak_state_bytes: int = 0
    preemptions: int = 0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class StreamEvent:
    """One token made by ``LLM.stream``.

    index: the request's place in the prompts; token_id: the token just made (-1 for a request that
    failed before running); delta: the text this event adds (``""`` while a multi-byte character
    or a possible stop string is incomplete); text: the text so far (the concatenation of the
    deltas); finished / finish_reason: as in ``CompletionOutput``; output: on the event that finishes
    a request, the request as ``generate`` reports it (tokens, text, KV report), else ``None``.
    """

    index: int
    request_id: str
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None
    delta: str = ""
    output: RequestOutput | None = None


class LLM:
    """Paged-KV engine running a headwise plan on a Hugging Face model.

    Each ``RequestOutput.kv`` reports the request's peak KV in whole blocks (``basis``): blocks,
    bytes, bytes per head kind, and ``dense_blocks`` / ``dense_bytes``, what a dense paged cache
    holds for the same stored tokens (every head ceil(tokens / block_size) blocks).

    Prompts are text, ``{"prompt_token_ids": [...]}``, or ``{"messages": [...]}`` (a chat
    conversation, run through the tokenizer's chat template; see ``chat``).

    Args:
        model: ``None`` (the embedded SmolLM2-135M-Instruct), a local checkpoint directory, or a
            loaded ``transformers`` causal LM (not patched by ``patch_model``; the engine applies
            the plan itself and restores the model's attention after each call).
        plan: a ``Plan``, a plan JSON path, ``"dense"`` or ``"uniform:<density>"``.
        tokenizer: needed with a model object when prompts are text or outputs should carry text.
        kv_cache_memory: size of the preallocated KV pool ("2GiB", "512MiB", or bytes).
        block_size, max_num_seqs, max_num_batched_tokens, dtype, backend, native_linear: see
            ``EngineConfig``.
        prefill: ``"sparse"`` or ``"dense"`` overrides the plan's prefill mode (``None``: the plan's).
            Dense prefill runs a prompt in one chunk with every head dense, then keeps only the
            plan's KV; a preempted request then recomputes its generated tokens densely too.
    """

    def __init__(self, model: Any = None, plan: Any = "dense", *, tokenizer=None, kv_cache_memory="2GiB",
                 block_size: int = 16, max_num_seqs: int = 16, max_num_batched_tokens: int = 8192,
                 dtype: torch.dtype | str = torch.float32, backend: str = "auto", native_linear: bool = True,
                 prefill: str | None = None):
        from ..models import load_model
        from ..patches import is_patched

        if model is not None and not isinstance(model, (str, os.PathLike, torch.nn.Module)) \
                or isinstance(model, torch.nn.Module) and not hasattr(model, "config"):
            raise InputError("LLM's model must be None (the embedded SmolLM2), a model name or checkpoint folder, "
                             f"or a loaded transformers causal LM, got {type(model).__name__}.")
        self.config = EngineConfig(kv_cache_memory=kv_cache_memory, block_size=block_size,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   dtype=dtype, backend=backend, native_linear=native_linear)
        if model is None or isinstance(model, (str, os.PathLike)):
            model, tokenizer = load_model(model, dtype=self.config.dtype)
        elif is_patched(model):
            raise InputError("the engine got a model patched by patch_model; pass the unpatched model "
                             "(unpatch_model(model)) and the plan to LLM(model, plan=...).")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.plan = Plan.from_spec(plan, model)
        self.prefill = self.plan.prefill if prefill is None else prefill
        if self.prefill not in PREFILL_MODES:
            raise InputError(f"prefill must be one of {list(PREFILL_MODES)} or None, got {prefill!r}.")
        text = model.config.get_text_config(decoder=True)
        self.vocab_size = text.vocab_size
        self.max_length = getattr(text, "max_position_embeddings", None) or 1 << 30
        head_dim = self.plan.model.head_dim
        element = next(model.parameters()).element_size()
        bs = self.config.block_size
        num_blocks, self.block_bytes = pool_size(self.config.kv_cache_memory, bs, head_dim, element)
        if num_blocks < 1:
            raise InputError(f"kv_cache_memory of {self.config.kv_cache_memory} bytes holds no {bs}-token block; "
                             "give the pool more memory.")
        self.blocks = BlockManager(num_blocks, bs)
        dense_prefill = self.prefill == "dense"
        self.scheduler = Scheduler(self.config, self.blocks, whole_prefill=dense_prefill)
        self.runner = ModelRunner(model, self.plan, self.config, num_blocks, dense_prefill=dense_prefill)
        self.eos_token_ids = self._eos_ids()
        self._begin()
        logger.info("headwise engine: %d blocks of %d tokens (%.1f MiB), plan %s, backend %s", num_blocks, bs,
                    num_blocks * self.block_bytes / 2**20, self.plan.calibration.get("method", "custom"),
                    self.config.backend)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer, self.model.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
        return ids

    # ---- requests -------------------------------------------------------------------------------
    def _token_ids(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty; give at least one token.")
            if self.tokenizer is None:
                raise InputError("text prompts need a tokenizer; pass LLM(model, tokenizer=...) or "
                                 "{'prompt_token_ids': [...]}.")
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if isinstance(ids, torch.Tensor):
                ids = ids.tolist()
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in ids):
                raise InputError("prompt_token_ids must be a list of whole numbers.")
            return prompt.get("prompt"), list(ids)
        if isinstance(prompt, dict) and "messages" in prompt:
            return self._chat_prompt(prompt["messages"])
        raise InputError("a prompt must be text, {'prompt_token_ids': [...]} or {'messages': [...]}, "
                         f"got {type(prompt).__name__}.")

    def _chat_prompt(self, messages: Any) -> tuple[str, list[int]]:
        """A conversation through the tokenizer's chat template, ending with the assistant's turn."""
        if self.tokenizer is None:
            raise InputError("chat needs a tokenizer; pass LLM(model, tokenizer=...).")
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError("the tokenizer has no chat template; send plain text prompts to generate() instead.")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InputError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages.")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise InputError(f"message {i} of the conversation must be a dict with 'role' and 'content' strings, "
                                 f"got {str(message)[:60]!r}.")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return text, list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _make_sequence(self, index: int, prompt: Any, params: Any, request_id: str | None = None) -> Sequence:
        params = SamplingParams.of(params)
        text, ids = self._token_ids(prompt)
        if not ids:
            raise InputError("the prompt is empty; give at least one token.")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the model's vocabulary of {self.vocab_size} tokens.")
        if len(ids) >= self.max_length:
            raise InputError(f"the prompt has {len(ids)} tokens but the model's context is {self.max_length}; "
                             "shorten it.")
        params.check()
        seq = Sequence(ids, params, self.plan, self.config.block_size, self.max_length, prompt=text,
                       request_id=str(index) if request_id is None else request_id)
        need = self.blocks.lifetime_blocks(seq)
        if need > self.blocks.num_blocks:
            raise InputError(f"the request needs {need} KV blocks at its length of {seq.target_length} tokens but "
                             f"the pool has {self.blocks.num_blocks}; raise kv_cache_memory or lower max_tokens.")
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        return seq

    # ---- running --------------------------------------------------------------------------------
    def generate(self, prompts: Any, sampling_params: SamplingParams | dict | list | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; one ``RequestOutput`` per prompt, in prompt order.

        A prompt is text, ``{"prompt_token_ids": [...]}`` or ``{"messages": [...]}`` (chat);
        ``sampling_params`` is one ``SamplingParams`` (or dict of its fields) for all, or a list,
        one per prompt. A request that cannot run (empty prompt, bad token ids, bad or unsupported
        params, longer than the model or the pool) fails alone: its output has ``error`` set and
        ``finish_reason == "error"``.
        """
        outputs = self._start(prompts, sampling_params)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(outputs), desc="headwise generate", unit="req")
        for event in self._loop():
            if event.finished and bar is not None:
                bar.update(1)
        if bar is not None:
            bar.update(len(outputs) - bar.n)
            bar.close()
        return [self._output(item) for item in outputs]

    def stream(self, prompts: Any, sampling_params: SamplingParams | dict | list | None = None
               ) -> Iterator[StreamEvent]:
        """Like ``generate`` but yields a ``StreamEvent`` for every token as it is made.

        ``event.delta`` is the text the token adds (incremental detokenization: a character split
        over tokens comes out whole, with the token that completes it; text that may begin a stop
        string is held back until it cannot); ``event.text`` the text so far. Requests that fail
        before running yield one finished event with ``finish_reason == "error"`` and token id -1.
        """
        items = self._start(prompts, sampling_params)
        for i, item in enumerate(items):
            if isinstance(item, RequestOutput):
                yield StreamEvent(i, item.request_id, -1, "", True, "error", output=item)
        yield from self._loop()

    def chat(self, messages: Any, sampling_params: SamplingParams | dict | list | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Answer one conversation or a list of them through the tokenizer's chat template.

        ``messages``: ``[{"role": "user", "content": "..."}, ...]`` or a list of such lists. The
        template is applied with the assistant's turn opened (``add_generation_prompt=True``); the
        outputs hold the assistant's reply. A bad conversation fails alone, as in ``generate``.
        Streaming: ``stream([{"messages": conversation}], ...)``.
        """
        if isinstance(messages, (list, tuple)) and messages and all(isinstance(m, dict) for m in messages):
            conversations = [messages]
        elif isinstance(messages, (list, tuple)) and messages:
            conversations = list(messages)
        else:
            raise InputError("chat takes a conversation [{'role': ..., 'content': ...}, ...] or a non-empty list "
                             "of them.")
        return self.generate([{"messages": c} for c in conversations], sampling_params, use_tqdm=use_tqdm)

    def add_request(self, prompt: Any, sampling_params: SamplingParams | dict | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request, also while ``stream`` or ``step`` is running (requests arriving over time).

        ``prompt`` and ``sampling_params`` as in ``generate``; ``request_id`` names the request in its
        events (default: its number since the last ``generate`` / ``stream`` call, as text; an id in
        use by a queued or running request is refused). Returns the id. A request that cannot run
        raises ``InputError`` here and leaves the others alone. Drive the engine with ``step`` (or
        iterate a running ``stream``, which also serves requests added meanwhile). ``last_stats``
        keeps counting across such requests until the next ``generate`` / ``stream`` call.
        """
        if request_id is not None and any(s.request_id == request_id
                                          for s in (*self.scheduler.waiting, *self.scheduler.running)):
            raise InputError(f"request id {request_id!r} is already queued or running; give each request its own.")
        index = self._count
        seq = self._make_sequence(index, prompt, sampling_params, request_id)
        self._count += 1
        self._index[id(seq)] = index
        self.scheduler.add(seq)
        return seq.request_id

    def has_unfinished_requests(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_work()

    def step(self) -> list[StreamEvent]:
        """Run one engine step (one scheduled batch) and return the tokens it made, one event per request.

        Returns ``[]`` when no request is waiting or running. The model runs headwise's attention from
        the first step after the engine was idle until the step that finishes the last request; if a
        step fails, every request is dropped, the model's attention is restored and the error raised.
        """
        if not self.scheduler.has_work():
            return []
        stats = self.last_stats
        if self.runner.previous_attn is None:
            self.runner.attach()
        try:
            batch = self.scheduler.schedule()
            self._account_peak(stats, batch)
            decode_only = all(seq.is_decoding for seq, _ in batch)
            t0 = time.perf_counter()
            samplers, logits = self.runner.run(batch, self.blocks.take_fresh())
            for seq, n in batch:
                seq.num_computed += n
            made = [self._append(seq, logits[row]) for row, seq in enumerate(samplers)]
            elapsed = time.perf_counter() - t0
        except BaseException:
            self._abort()
            raise
        stats.steps += 1
        if decode_only:
            stats.decode_seconds += elapsed
            stats.decode_steps += 1
            stats.decode_tokens += len(batch)
        else:
            stats.prefill_seconds += elapsed
            stats.prefill_tokens += sum(n for seq, n in batch if not (n == 1 and seq.num_computed > 1))
        stats.preemptions = self.scheduler.num_preemptions - self._preempted_before
        if not self.scheduler.has_work():
            self.runner.detach()
        return [StreamEvent(self._index.pop(id(seq)) if finished else self._index[id(seq)], seq.request_id, token,
                            seq.text[:seq.streamed], finished, seq.finish_reason, delta,
                            self._output(seq) if finished else None)
                for seq, token, finished, delta in made]

    def _begin(self) -> None:
        """A ``generate`` / ``stream`` call: fresh statistics and request numbering."""
        self.last_stats = EngineStats(num_blocks=self.blocks.num_blocks)
        self._preempted_before = self.scheduler.num_preemptions
        self._items: list[Sequence | RequestOutput] = []     # the generate / stream call's requests, in order
        self._index: dict[int, int] = {}                 # id(sequence) -> its number, while it runs
        self._count = 0

    def _abort(self) -> None:
        """Drop every request and restore the model's attention (a failed step, a stream left early)."""
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
        self.scheduler.waiting.clear()
        self._index.clear()
        self.runner.detach()

    def _start(self, prompts: Any, sampling_params) -> list[Sequence | RequestOutput]:
        if self.scheduler.has_work():
            raise RuntimeError("this LLM is already generating; wait for the running call to finish, or queue "
                               "more requests with add_request.")
        if isinstance(prompts, (str, dict)) or not hasattr(prompts, "__iter__"):
            prompts = [prompts]                   # one prompt (a wrong type then fails alone, with its sentence)
        prompts = list(prompts)
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InputError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one per prompt.")
        self._begin()
        items = self._items
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                seq = self._make_sequence(i, prompt, p)
            except InputError as e:
                logger.warning("headwise engine: request %d failed: %s", i, e)
                ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
                items.append(RequestOutput(str(i), prompt if isinstance(prompt, str) else None,
                                           list(ids) if isinstance(ids, (list, tuple)) else [],
                                           [CompletionOutput(0, "", [], "error")], True, error=str(e)))
                continue
            self._index[id(seq)] = i
            items.append(seq)
            self.scheduler.add(seq)
        self._count = len(items)
        return items

    def _loop(self) -> Iterator[StreamEvent]:
        try:
            while self.scheduler.has_work():
                yield from self.step()
        finally:
            if self.scheduler.has_work():          # left early (or failed): free everything, keep the engine usable
                self._abort()

    def _append(self, seq: Sequence, logits: torch.Tensor) -> tuple[Sequence, int, bool, str]:
        """Sample ``seq``'s next token, decide whether it ends the request, extend its text.

        Returns ``(seq, token, finished, delta)``, ``delta`` being the text given out now."""
        p = seq.params
        ending = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        logits = process_logits(logits, p, seq.prompt_token_ids, seq.output_token_ids, ending)
        token = sample(logits, p, seq.generator)
        seq.output_token_ids.append(token)
        made = len(seq.output_token_ids)
        may_stop = made >= p.min_tokens
        if may_stop and token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif may_stop and token in self.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif made >= p.max_tokens or seq.num_tokens >= self.max_length:
            seq.finish_reason = "length"
        stops = p.stop_strings
        if seq.detokenizer is not None:
            before = len(seq.text)
            seq.text += seq.detokenizer.add(token, final=seq.finish_reason is not None)
            if stops and may_stop and seq.finish_reason != "stop":
                self._cut_at_stop(seq, stops, start=max(0, before - max(map(len, stops)) + 1))
        finished = seq.finish_reason is not None
        hold = 0 if finished or not stops or p.include_stop_str_in_output else max(map(len, stops)) - 1
        upto = max(seq.streamed, len(seq.text) - hold)
        delta, seq.streamed = seq.text[seq.streamed:upto], upto
        if finished:
            self.scheduler.finish(seq)
        return seq, token, finished, delta

    @staticmethod
    def _cut_at_stop(seq: Sequence, stops: list[str], start: int) -> None:
        """End ``seq`` at the earliest stop string found in its text from ``start`` on."""
        found = [(at, stop) for stop in stops if (at := seq.text.find(stop, start)) >= 0]
        if not found:
            return
        at, stop = min(found, key=lambda x: x[0])
        keep = at + len(stop) if seq.params.include_stop_str_in_output else at
        seq.text, seq.finish_reason, seq.stop_reason = seq.text[:keep], "stop", stop

    def _account_peak(self, stats: EngineStats, batch) -> None:
        """Peak blocks held (split by head kind) and, separately, the peak a dense cache would hold."""
        scheduled = {id(seq): n for seq, n in batch}
        dense_blocks = sum(self._dense_blocks(seq.num_computed + scheduled.get(id(seq), 0))
                           for seq in self.scheduler.running)
        stats.dense_kv_bytes = max(stats.dense_kv_bytes, dense_blocks * self.block_bytes)
        stats.peak_state_bytes = max(stats.peak_state_bytes, sum(_state_bytes(s) for s in self.scheduler.running))
        used = self.blocks.num_used
        if used <= stats.peak_blocks:
            return
        stats.peak_blocks = used
        stats.peak_kv_bytes = used * self.block_bytes
        by_kind: dict[str, int] = {}
        for seq in self.scheduler.running:
            for layer, kinds in enumerate(seq.kinds):
                for h, kind in enumerate(kinds):
                    by_kind[kind] = by_kind.get(kind, 0) + int(seq.nblocks[layer, h]) * self.block_bytes
        stats.kv_bytes_by_kind = by_kind

    def _dense_blocks(self, tokens: int) -> int:
        """Blocks a dense paged cache holds for ``tokens`` stored tokens: every KV head ceil(tokens / block_size)."""
        heads = self.plan.model.num_layers * self.plan.model.num_kv_heads
        return heads * -(-tokens // self.config.block_size)

    def _output(self, item: Sequence | RequestOutput) -> RequestOutput:
        if isinstance(item, RequestOutput):
            return item
        seq = item
        dense_blocks = self._dense_blocks(seq.num_computed)
        kv = {"basis": f"whole blocks of {self.config.block_size} tokens",
              "peak_blocks": seq.peak_blocks, "peak_bytes": seq.peak_blocks * self.block_bytes,
              "peak_bytes_by_kind": {k: b * self.block_bytes for k, b in seq.peak_blocks_by_kind.items()},
              "dense_blocks": dense_blocks, "dense_bytes": dense_blocks * self.block_bytes,
              "state_bytes": _state_bytes(seq)}
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids,
                             [CompletionOutput(0, seq.text, list(seq.output_token_ids), seq.finish_reason,
                                               seq.stop_reason)],
                             seq.status is Status.FINISHED, kv=kv)


def _state_bytes(seq: Sequence) -> int:
    """Bytes of a request's recurrent states (heads that keep no KV)."""
    return sum(t.numel() * t.element_size() for t in seq.states.values())
