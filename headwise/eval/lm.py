"""The ``headwise`` lm-eval model: Hugging Face's ``HFLM`` running a headwise plan.

``--model headwise --model_args pretrained=<dir or default>,plan=<plan.json | dense | uniform:0.25>``.
lm-eval's own request batching and scoring run unchanged; two things are added so a plan sees
what it was made for:

- generation (left padded) runs inside ``expected_length(model, prompt + max_gen_toks)``, the
  length the plan's elastic spans are sized for. Sequences of one batch can reach different
  lengths, and one ``expected_length`` serves one length, so a batch of an elastic plan is split
  into groups of equal target length (exact; cheap on CPU where batching gains little).
- loglikelihood (right padded) passes the padding mask that lm-eval leaves out, so every row's
  spans use its own real length, not the batch's padded width.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..patches import expected_length, is_patched, patch_model, unpatch_model
from ..kinds.rules import as_rule
from ..plan import Plan, PlanError

logger = logging.getLogger("headwise")


def is_elastic(plan: Plan) -> bool:
    """Whether any head's span depends on the sequence length (a non-dense ``kv_rule`` with ``beta > 0``, any kind)."""
    return any(not r.dense and r.beta > 0 for r in (as_rule(h.kv_rule()) for h in plan.heads))


@register_model("headwise")
class HeadwiseLM(HFLM):
    """lm-eval model running ``plan`` on a local checkpoint (or the embedded SmolLM2-135M-Instruct).

    Args:
        pretrained: a local checkpoint directory; ``""``/``"default"``/``None`` for the embedded
            model; or an already loaded ``transformers`` model (then pass ``tokenizer``).
        plan: a plan JSON path, ``"dense"`` or ``"uniform:<density>[:<sink>]"``, or a ``Plan``.
        kernels: kernel backend for window heads (``"auto"``, ``"naive"``, ``"cpu"``, ...).
        tokenizer: with a model object, its tokenizer.
        device, dtype: where and in which dtype to load a checkpoint (default: CUDA if present, fp32).
        **kwargs: the rest of ``HFLM``'s options (``batch_size``, ``max_length``, ...).
    """

    def __init__(self, pretrained=None, plan="dense", kernels: str = "auto", tokenizer=None,
                 device: str | None = None, dtype: str | torch.dtype | None = None, **kwargs):
        from ..models import load_model

        if pretrained is None or isinstance(pretrained, str):
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or torch.float32)
            path = None if pretrained in (None, "", "default") else pretrained
            model, loaded_tokenizer = load_model(path, dtype=torch_dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with a model object as pretrained=.")
            model = pretrained
        if is_patched(model):
            raise ValueError("the model given to the headwise lm-eval model is already patched; pass an unpatched "
                             "model and the plan as plan=.")
        try:
            self.plan = Plan.from_spec(plan, model)
        except PlanError as e:
            raise PlanError(f"headwise lm-eval model cannot use plan {str(plan)!r}: {e}") from None
        self.plan_name = str(plan) if not isinstance(plan, Plan) else plan.calibration.get("method", "plan")
        patch_model(model, self.plan, backend=kernels)
        self._elastic = is_elastic(self.plan)
        self._known_inputs: dict[tuple[int, ...], set[int]] | None = None
        logger.info("headwise lm-eval model: plan %s (density %.3f at 4k, kernels %s)", self.plan_name,
                    self.plan.density(4096), kernels)
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        except Exception:
            unpatch_model(model)
            raise

    # ---- loglikelihood: right padding ---------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """lm-eval's scoring, with the real length of every input row known to ``_model_call``."""
        with self._remember_inputs(requests):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    @contextmanager
    def _remember_inputs(self, requests):
        known: dict[tuple[int, ...], set[int]] = {}
        for _, context, continuation in requests:
            inp = (context + continuation)[-(self.max_length + 1):][:-1]
            known.setdefault(_strip_zeros(inp), set()).add(len(inp))
        previous, self._known_inputs = self._known_inputs, known
        try:
            yield
        finally:
            self._known_inputs = previous

    def padding_mask(self, inps: torch.Tensor) -> torch.Tensor | None:
        """``[B, T]`` mask of real tokens for a right-padded ``[B, T]`` batch; ``None`` if unpadded.

        lm-eval pads with token 0 and keeps the lengths to itself; each row is matched to the
        request it came from (its tokens without trailing zeros).
        """
        if self._known_inputs is None or inps.shape[0] == 1:
            return None
        width = inps.shape[1]
        lengths = []
        for row in inps.tolist():
            candidates = {n for n in self._known_inputs.get(_strip_zeros(row), ()) if n <= width}
            if len(candidates) != 1:
                raise RuntimeError(f"cannot tell the real length of a right-padded row (candidates {sorted(candidates)}); "
                                   "run with batch_size=1.")
            lengths.append(candidates.pop())
        if min(lengths) == width:
            return None
        return torch.arange(width, device=inps.device)[None, :] < torch.tensor(lengths, device=inps.device)[:, None]

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels=None) -> torch.Tensor:
        """``[B, T]`` token ids -> ``[B, T, vocab]`` logits, with the padding mask of the batch."""
        if attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        mask = self.padding_mask(inps)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(input_ids=inps, attention_mask=mask).logits

    # ---- generation: left padding -------------------------------------------------------------
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """Greedy/sampled generation of ``[B, T]`` left-padded ``context`` up to ``max_length``
        columns, with elastic spans sized for each sequence's prompt + new tokens."""
        mask = generation_kwargs.get("attention_mask")
        new_tokens = max_length - context.shape[1]
        real = mask.sum(-1) if mask is not None else torch.full((context.shape[0],), context.shape[1])
        targets = (real + new_tokens).tolist()
        groups = sorted(set(targets)) if self._elastic else [max(targets)]
        if len(groups) == 1:
            with expected_length(self.model, groups[0]):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
        logger.info("headwise: elastic plan, generating %d rows in %d groups of equal target length",
                    len(targets), len(groups))
        outputs: list[torch.Tensor | None] = [None] * len(targets)
        for target in groups:
            rows = torch.tensor([i for i, t in enumerate(targets) if t == target], device=context.device)
            kwargs = dict(generation_kwargs)
            if mask is not None:
                kwargs["attention_mask"] = mask[rows]
            with expected_length(self.model, target):
                out = super()._model_generate(context[rows], max_length, stop, **kwargs)
            for j, i in enumerate(rows.tolist()):
                outputs[i] = out[j]
        width = max(o.shape[0] for o in outputs)
        pad = self.tokenizer.pad_token_id
        return torch.stack([torch.nn.functional.pad(o, (0, width - o.shape[0]), value=pad) for o in outputs])


def _strip_zeros(tokens) -> tuple[int, ...]:
    end = len(tokens)
    while end and tokens[end - 1] == 0:
        end -= 1
    return tuple(tokens[:end])
