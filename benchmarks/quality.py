"""Calibrated plans vs dense vs uniform sink + window at equal density, on the embedded SmolLM2 (or ``--model``).

Retrieval: passkey and multi-key needle-in-a-haystack (headwise.eval.tasks generators), greedy,
correct when the answer appears in the output. Perplexity: real-prose documents
(headwise.eval.tasks.perplexity), scored on the second half of each document (where a window
head has dropped the most). Prints a markdown table and checks issue 13's targets.

    flock /tmp/headwise-heavy.lock python benchmarks/quality.py \\
        --plan headwise/plans/baselines/smollm2-135m-d25-v1.json,smollm2-135m-d25 \\
        --lengths 2048,4096,8192 --trials 50,50,20 --cache bench25.jsonl

Every plan but dense runs in three modes (``--modes``):

- ``sparse``: the plan's sparse prefill (every head reads only its sink + window while the prompt
  is prefilled), then greedy decoding; one patched forward per plan and prompt.
- ``dense``: the runtime's dense-prefill mode: the whole prompt runs dense, the cache then keeps
  only each head's sink + window, decoding follows the plan. The dense prefill of the prompt is the
  same computation for every plan, so it runs once per prompt (unpatched), and each plan's cache
  is made from it by the runtime's own cache code (``HeadwiseLayer.update`` on the dense keys;
  ``lightning`` / ``hybrid`` heads fold the same keys into their recurrent states, ``fold_states``):
  the same result as ``patch_model(model, plan, prefill="dense")`` on the whole prompt (checked
  in ``--check``), at a fraction of the cost.
- ``ctx``: the protocol of KV-compression benchmarks (kvpress): only the context (the prompt up to
  its question) is prefilled dense; the plan's cache is made from it, and the question and the
  answer run against that compressed cache. Stricter than ``dense``: the question cannot read
  the dropped context.

Perplexity in ``sparse`` is one patched forward per document; in ``dense`` and ``ctx`` the first
half is prefilled dense once (shared), each plan's cache made from it, and the second half fed
through the patched model ``--ppl-chunk`` tokens at a time, every token reading exactly what a
decode step reads (its head's sink + window of what is kept; ``decode_rule``), which is what a
dense-prefill plan sees when it generates the rest of a document (both modes are the same
computation for perplexity; the table shows it once, under ``dense``).

Greedy decoding in the dense and ctx modes is guided (``greedy_guided``): the dense model's tokens
are verified in one forward and the plan steps on only from its first disagreement: the same
tokens as step-by-step decoding at a fraction of the forwards.

``--cache`` keeps per-prompt results in a JSONL file, so a run split into pieces (``timeout``
under the heavy-job lock) resumes where it stopped, and a run with more plans computes only the
rows its cache lacks (e.g. the dense rows are computed once). ``--trials`` takes one count or one per
length. Note the calibration data (``pydoc_data.topics`` for v1 profiles; stdlib docstrings for
v2's gate data) and the perplexity documents may share passages.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and not __package__:   # python benchmarks/quality.py: this checkout first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import (SHIPPED_D25, ResultStore, per_length, plan_key, provenance,  # noqa: E402
                               provenance_line, spread_rank)
from headwise.patches.prefilled import continuation_nll, decode_rule, kv_of, plan_cache  # noqa: E402,F401

QUESTION_MARK = "\n\nWhat is"        # where the question of the passkey and niah prompts starts
MODES = ("sparse", "dense", "ctx")


# ---- building blocks --------------------------------------------------------------------------
def split_at_question(tokenizer, prompt: str) -> tuple[torch.Tensor, int]:
    """Token ids ``[1, P]`` of ``prompt`` and the number of context tokens before its question
    (the token holding the question's first character starts the question)."""
    cut = prompt.rfind(QUESTION_MARK)
    if cut < 0:
        raise ValueError(f"prompt has no question starting with {QUESTION_MARK!r}; the bench splits context "
                         "from question there.")
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False, return_offsets_mapping=True)
    ends = enc.offset_mapping[0, :, 1]
    context = int((ends <= cut).sum())
    return enc.input_ids, context


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, budget: int, eos: int, done=None) -> list[int]:
    """Greedy tokens from the last ``logits`` ``[1, q, V]`` on, through ``cache``: at most ``budget``,
    stopping after EOS or once ``done(tokens)`` (the answer is complete: more tokens cannot change
    a contains-the-answer score)."""
    return greedy_from(model, cache, logits, [], budget, eos, done)


def greedy_from(model, cache, logits: torch.Tensor, prefix: list[int], budget: int, eos: int, done=None) -> list[int]:
    """``greedy`` after ``prefix`` tokens already fed (``logits`` are the last forward's): the
    stopping rule counts the prefix."""
    token = logits[:, -1:].argmax(-1)
    out = [*prefix, int(token)]
    while len(out) < budget and out[-1] != eos and not (done and done(out)):
        logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        out.append(int(token))
    return out


@torch.no_grad()
def greedy_guided(model, make, guess: list[int], budget: int, eos: int, done=None) -> list[int]:
    """The tokens ``greedy`` gives from ``make()`` (a fresh ``(cache, logits)``), computed by verifying
    ``guess`` (the dense model's greedy tokens) in one forward under the plan's decode rule: where the
    plan's argmax agrees with every guessed token its output is the guess; at the first disagreement
    the agreed prefix is fed to a fresh cache and greedy decoding continues from there. The same
    tokens as decoding step by step (a query reads the same keys either way; float rounding aside)
    for one forward instead of one per agreed token."""
    stop = lambda out: len(out) >= budget or out[-1] == eos or bool(done and done(out))  # noqa: E731
    cache, logits = make()
    if not guess or int(logits[0, -1].argmax()) != guess[0] or len(guess) == 1:
        return greedy_from(model, cache, logits, [], budget, eos, done)
    with decode_rule(model):
        predicted = model(input_ids=torch.tensor([guess[:-1]]), past_key_values=cache, use_cache=True).logits[0]
    wrong = (predicted.argmax(-1) != torch.tensor(guess[1:])).nonzero()
    if not len(wrong):                                    # the plan's output so far is the guess
        if stop(guess):
            return list(guess)
        with decode_rule(model):
            logits = model(input_ids=torch.tensor([guess[-1:]]), past_key_values=cache, use_cache=True).logits
        return greedy_from(model, cache, logits, list(guess), budget, eos, done)
    agreed = int(wrong[0]) + 1                            # guess[:agreed] is the plan's own output
    out = [*guess[:agreed], int(predicted[agreed - 1].argmax())]
    if stop(out):
        return out
    cache, _ = make()
    with decode_rule(model):
        logits = model(input_ids=torch.tensor([guess[:agreed]]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits
    return greedy_from(model, cache, logits, guess[:agreed], budget, eos, done)


# ---- one prompt, every plan -----------------------------------------------------------------------
def dense_prefill(model, ids: torch.Tensor, context: int, kv_file: Path | None):
    """The dense prefill every dense/ctx row shares: ``(cache, [(keys, values)] per layer, last logits
    [1, 1, V], seconds)``, the context and the question prefilled in two forwards (so the context's
    KV is exactly what a context-only prefill gives). With ``kv_file`` the KV and logits are kept
    in a safetensors file and read back on a later run, so plans added later cost only their decode."""
    from safetensors.torch import load_file, save_file
    from transformers.cache_utils import DynamicCache

    if kv_file is not None and kv_file.is_file():
        saved = load_file(kv_file)
        layers = len([k for k in saved if k.startswith("k.")])
        kv = [(saved[f"k.{i}"], saved[f"v.{i}"]) for i in range(layers)]
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k.clone(), v.clone(), i)
        return cache, kv, saved["logits"], float(saved["seconds"])
    t0 = time.perf_counter()
    out = model(input_ids=ids[:, :context], use_cache=True, logits_to_keep=1)
    out = model(input_ids=ids[:, context:], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - t0
    kv = [(k.clone(), v.clone()) for k, v in kv_of(out.past_key_values)]
    if kv_file is not None:
        kv_file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"k.{i}": k.contiguous() for i, (k, _) in enumerate(kv)}
        tensors |= {f"v.{i}": v.contiguous() for i, (_, v) in enumerate(kv)}
        save_file({**tensors, "logits": out.logits.contiguous(), "seconds": torch.tensor(seconds)}, str(kv_file))
    return out.past_key_values, kv, out.logits, seconds


@torch.no_grad()
def retrieval_trial(model, tokenizer, prompt: str, answers, budget: int, plans: dict, modes: list[str],
                    need: set[str] | None = None, kv_file: Path | None = None) -> dict:
    """Every plan in every mode on one retrieval prompt. Returns ``{row name: {"ok", "prefill_s"}}``
    (``row name``: ``dense`` or ``"<plan> | <mode>"``); with ``need``, only those rows (the rest are
    in the result cache already)."""
    from headwise import expected_length, patch_model, unpatch_model
    from headwise.eval.scoring import contains_all

    wanted = (lambda row: True) if need is None else need.__contains__  # noqa: E731
    eos = tokenizer.eos_token_id
    ids, context = split_at_question(tokenizer, prompt)
    target = ids.shape[1] + budget
    ok = lambda tokens: contains_all(list(answers), tokenizer.decode(tokens, skip_special_tokens=True)) == 1.0  # noqa: E731
    run = lambda cache, logits: ok(greedy(model, cache, logits, budget, eos, ok))  # noqa: E731
    rows = {}
    shared = [m for m in ("dense", "ctx") if m in modes and any(wanted(f"{name} | {m}") for name in plans)]
    if wanted("dense") or shared:                 # the dense prefill: its row and the shared caches
        cache, full_kv, full_logits, dense_s = dense_prefill(model, ids, context, kv_file)
        ctx_kv = [(k[:, :, :context], v[:, :, :context]) for k, v in full_kv]
        dense_tokens = greedy(model, cache, full_logits, budget, eos, ok)     # they guide the plans' decoding
        if wanted("dense"):
            rows["dense"] = {"ok": ok(dense_tokens), "prefill_s": round(dense_s, 3)}
    guided = lambda make: ok(greedy_guided(model, make, dense_tokens, budget, eos, ok))  # noqa: E731

    def question_on(kv):                          # ctx mode: the question read against the plan's cache
        cache = plan_cache(model, kv)
        return cache, model(input_ids=ids[:, context:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    for name, spec in plans.items():
        if any(wanted(f"{name} | {m}") for m in shared):
            patch_model(model, spec, prefill="dense")
            try:
                with expected_length(model, target):
                    if "dense" in shared and wanted(f"{name} | dense"):
                        rows[f"{name} | dense"] = {"ok": guided(lambda: (plan_cache(model, full_kv), full_logits)),
                                                   "prefill_s": round(dense_s, 3)}
                    if "ctx" in shared and wanted(f"{name} | ctx"):
                        rows[f"{name} | ctx"] = {"ok": guided(lambda: question_on(ctx_kv))}
            finally:
                unpatch_model(model)
        if "sparse" in modes and wanted(f"{name} | sparse"):
            patch_model(model, spec, prefill="sparse")
            try:
                with expected_length(model, target):
                    t0 = time.perf_counter()
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                    seconds = time.perf_counter() - t0
                    rows[f"{name} | sparse"] = {"ok": run(out.past_key_values, out.logits),
                                                "prefill_s": round(seconds, 3)}
            finally:
                unpatch_model(model)
    return rows


@torch.no_grad()
def perplexity_trial(model, tokenizer, text: str, plans: dict, modes: list[str], chunk: int,
                     need: set[str] | None = None) -> dict:
    """Summed NLL and count over the second half of ``text`` for dense and every plan:
    ``{row name: [nll, tokens]}`` (the ``dense`` mode row stands for ``ctx`` too); with ``need``,
    only those rows."""
    from headwise import patch_model, unpatch_model

    wanted = (lambda row: True) if need is None else need.__contains__  # noqa: E731

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    half = (ids.shape[1] - 1) // 2 + 1          # first scored target: token `half`

    def second_half(logits):                    # logits [1, P, V] of the whole document
        nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
        return [float(nll[half - 1:].sum()), int(nll[half - 1:].numel())]

    rows = {"dense": dense_second_half(model, ids, half, chunk)} if wanted("dense") else {}
    shared = ("dense" in modes or "ctx" in modes) and any(wanted(f"{name} | dense") for name in plans)
    if shared:                                  # the shared dense prefill of the first half
        first = model(input_ids=ids[:, :half], use_cache=True, logits_to_keep=1)
        first_kv, last = kv_of(first.past_key_values), first.logits[:, -1:]
    for name, spec in plans.items():
        if "sparse" in modes and wanted(f"{name} | sparse"):
            patch_model(model, spec, prefill="sparse")
            try:
                rows[f"{name} | sparse"] = second_half(model(input_ids=ids, use_cache=False).logits)
            finally:
                unpatch_model(model)
        if shared and wanted(f"{name} | dense"):
            patch_model(model, spec, prefill="dense")
            try:
                total, count = continuation_nll(model, first_kv, last, ids[:, half:], ids.shape[1], chunk)
                rows[f"{name} | dense"] = [total, count]
            finally:
                unpatch_model(model)
    return rows


def dense_second_half(model, ids: torch.Tensor, half: int, chunk: int) -> list:
    """``[summed NLL, tokens]`` of the unpatched model over ``ids[0, half:]`` (``ids`` ``[1, P]``): one
    forward of the decoder, the output head applied ``chunk`` positions at a time, so the logits held
    are ``chunk x V``, not ``P x V`` (Qwen2.5's 151,936-token vocabulary at 16k would be 9.7 GB)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state          # [1, P, hidden]
    head = model.get_output_embeddings()
    total, count = 0.0, 0
    for start in range(half - 1, ids.shape[1] - 1, chunk):                       # position p predicts token p + 1
        stop = min(start + chunk, ids.shape[1] - 1)
        logits = head(hidden[0, start:stop]).float()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, start + 1:stop + 1], reduction="sum"))
        count += stop - start
    return [total, count]


def check_dense_mode(model, tokenizer, plan, prompt: str, budget: int) -> None:
    """The shared-prefill ``dense`` mode must give what ``patch_model(prefill="dense")`` gives."""
    from headwise import patch_model, unpatch_model
    from headwise.demo import greedy_passkey

    patch_model(model, plan, prefill="dense")
    try:
        text, *_ = greedy_passkey(model, tokenizer, prompt, budget)
    finally:
        unpatch_model(model)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    patch_model(model, plan, prefill="dense")
    try:
        from headwise import expected_length

        with expected_length(model, ids.shape[1] + budget):
            tokens = greedy(model, plan_cache(model, kv_of(out.past_key_values)), out.logits, budget, -1)
    finally:
        unpatch_model(model)
    shared = tokenizer.decode(tokens, skip_special_tokens=True)
    print(f"check: runtime dense prefill {text!r} vs shared prefill {shared!r}: "
          f"{'same' if text == shared else 'DIFFERENT'}", flush=True)
    if text != shared:
        raise SystemExit("the shared dense prefill does not reproduce the runtime's dense-prefill mode.")


# ---- report -----------------------------------------------------------------------------------------
def summarize(kind: str, values: list):
    """One cell from per-prompt results: perplexity over the documents' tokens, or ``(right, trials)``."""
    if kind == "perplexity":
        return math.exp(sum(v[0] for v in values) / sum(v[1] for v in values))
    return sum(bool(v["ok"]) for v in values), len(values)


@dataclass(frozen=True)
class Targets:
    """The targets a calibrated row is checked against: least share of dense's right answers per
    task (``niah`` up to 4k tokens, ``niah_long`` above) and most perplexity increase over dense;
    every metric also at least the uniform row's at the same density."""

    source: str
    passkey: float
    niah: float
    niah_long: float
    perplexity: float

    def retrieval(self, kind: str, n: int) -> float:
        return self.passkey if kind == "passkey" else self.niah if n <= 4096 else self.niah_long


def targets_for(model: str | None, density: float) -> Targets:
    """The open issues' targets: Qwen's d25 (issue 27), SmolLM2's 25% and 50% plans (issue 26)."""
    if model == "qwen2.5-coder-0.5b":
        return Targets("issue 27", passkey=0.95, niah=0.90, niah_long=0.90, perplexity=0.05)
    if density >= 0.5:
        return Targets("issue 26 at 50%", passkey=1.0, niah=1.0, niah_long=1.0, perplexity=0.015)
    return Targets("issue 26 at 25%", passkey=1.0, niah=0.95, niah_long=0.85, perplexity=0.05)


def target_checks(per_prompt: dict, dense: str, uniform: str, calibrated: str, kinds: list[str],
                  lengths: list[int], targets: Targets) -> list[str]:
    """``targets`` at one row, one line per task and length, with the margin met or missed.

    ``per_prompt[(row, kind, n)]`` maps prompt index -> result; the three rows are compared on the
    prompts all three have (paired), so rows with more trials do not skew the comparison."""
    verdict = lambda ok: "met" if ok else "missed"                          # noqa: E731
    lines = []
    for kind in kinds:
        for n in lengths:
            if any((p, kind, n) not in per_prompt for p in (dense, uniform, calibrated)):
                continue
            common = sorted(set.intersection(*(set(per_prompt[(p, kind, n)]) for p in (dense, uniform, calibrated))))
            if not common:
                continue
            d, u, c = (summarize(kind, [per_prompt[(p, kind, n)][i] for i in common])
                       for p in (dense, uniform, calibrated))
            if kind == "perplexity":
                change = c / d - 1.0
                lines.append(f"{calibrated}: perplexity {n} ({len(common)} docs): {c:.3f} vs dense {d:.3f} "
                             f"({change:+.1%}; target <= {targets.perplexity:+.1%}: "
                             f"{verdict(change <= targets.perplexity)}); uniform {u:.3f} ({u / d - 1.0:+.1%}; "
                             f"below uniform: {verdict(c < u)})")
                continue
            acc = {p: r[0] / r[1] for p, r in ((dense, d), (uniform, u), (calibrated, c))}
            of_dense = acc[calibrated] / acc[dense] if acc[dense] else float("nan")
            wanted = targets.retrieval(kind, n)
            lines.append(f"{calibrated}: {kind} {n} ({len(common)} trials): {acc[calibrated]:.0%}, dense "
                         f"{acc[dense]:.0%}, uniform {acc[uniform]:.0%}; of dense {of_dense:.2f} (target >= "
                         f"{wanted:.2f}: {verdict(of_dense >= wanted) if acc[dense] else 'n/a, dense 0'}); "
                         f"at least uniform: {verdict(acc[calibrated] >= acc[uniform])}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", default=SHIPPED_D25,
                        help="calibrated plan(s), comma-separated")
    parser.add_argument("--modes", default="sparse,dense,ctx", help=f"comma-separated from {','.join(MODES)}")
    parser.add_argument("--density", default=None, help="uniform baseline density or densities, comma-separated "
                        "(default: each plan's own); a plan is checked against the uniform row of its density")
    parser.add_argument("--no-uniform", action="store_true",
                        help="no uniform sink + window baseline (e.g. plans of lightning/hybrid heads, whose KV is not a "
                             "density); the targets, which compare with it, are then not checked")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--trials", default="50", help="prompts per retrieval task and length (needle depths): "
                        "one count, or one per length")
    parser.add_argument("--ppl-docs", default="10", help="perplexity documents per length (one, or one per length)")
    parser.add_argument("--ppl-chunk", type=int, default=1024, help="tokens per forward of the dense-prefill "
                        "perplexity's second half (each token reads what a decode step reads, whatever the chunk)")
    parser.add_argument("--tasks", default="passkey,niah,perplexity")
    parser.add_argument("--json", default=None, help="also write the results here (benchmarks/quality_plot.py "
                        "draws quality against KV kept from it)")
    parser.add_argument("--cache", default=None, help="JSONL of per-prompt results: reused and extended, so an "
                        "interrupted or repeated run only computes what is missing")
    parser.add_argument("--kv-store", default=None, help="folder keeping each retrieval prompt's dense-prefill KV "
                        "(fp32 safetensors, ~190 MB per 4k prompt), so plans added to a later run skip the prefill")
    parser.add_argument("--report-only", action="store_true", help="print the table from --cache, compute nothing")
    parser.add_argument("--check", action="store_true", help="first check the shared dense prefill against "
                        "patch_model(prefill='dense') on one prompt")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model name (headwise model list) or local checkpoint folder "
                        "(default: the embedded SmolLM2); its results are keyed by its name in --cache, so one "
                        "cache file may hold several models")
    args = parser.parse_args()
    info = provenance()
    print(provenance_line(info))

    from tqdm import tqdm

    from headwise import load_model, load_plan
    from headwise.eval import tasks as eval_tasks
    from headwise.eval.taskfiles import KINDS
    from headwise.plan import ModelInfo, Plan

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model_name = ModelInfo.of(model).name
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--modes takes names from {', '.join(MODES)}, got {args.modes!r}.")
    paths = [p.strip() for p in args.plan.split(",") if p.strip()]
    loaded = [load_plan(p, model) for p in paths]
    plan_density = {Path(p).stem: plan.calibration.get("density") for p, plan in zip(paths, loaded)}
    densities = ([] if args.no_uniform else [float(x) for x in args.density.split(",")] if args.density
                 else sorted({float(d) for d in plan_density.values() if d is not None}))
    uniform_of = {d: f"uniform {d:g}" for d in densities}
    plans = {uniform_of[d]: Plan.uniform(model, d) for d in densities}
    for path, plan in zip(paths, loaded):
        plans[Path(path).stem] = plan
    # each calibrated plan is checked against the uniform row nearest its own density
    baseline = {name: uniform_of[min(densities, key=lambda d: abs(d - float(dens)))]
                for name, dens in plan_density.items() if densities and dens is not None}
    keys = {name: plan_key(spec) for name, spec in plans.items()}
    lengths = [int(x) for x in args.lengths.split(",")]
    trials = dict(zip(lengths, per_length(args.trials, lengths)))
    docs = dict(zip(lengths, per_length(args.ppl_docs, lengths, "--ppl-docs")))
    kinds = [k.strip() for k in args.tasks.split(",") if k.strip()]
    store = ResultStore(Path(args.cache) if args.cache else None)
    if args.check:
        check_dense_mode(model, tokenizer, loaded[-1],
                         eval_tasks.generate("passkey", tokenizer, lengths[0], 1, args.seed)[0].prompt, 12)

    rows = ["dense"] + [f"{name} | {mode}" for name in plans for mode in modes]
    # the embedded model's keys carry no model name (caches written before --model stay valid)
    tag = "" if args.model is None else f"{model_name}|"
    row_key = lambda row: tag + ("dense" if row == "dense" else f"{keys[row.split(' | ')[0]]}|{row.split(' | ')[1]}")  # noqa: E731
    with torch.no_grad():                           # warm-up: the first forward pays one-time setup costs
        model(input_ids=torch.ones(1, 64, dtype=torch.long), use_cache=False, logits_to_keep=1)
    started = time.perf_counter()
    if not args.report_only:
        samples = {(kind, n): eval_tasks.generate(kind, tokenizer, n, docs[n] if kind == "perplexity" else trials[n],
                                                  args.seed) for n in lengths for kind in kinds}
        # waves of evenly spread trial indices over every length and task, so a run cut short by its
        # time limit still has needles at every depth (and resumes from --cache)
        todo = [(wave, n, kind, i) for (kind, n), group in samples.items() for i in range(len(group))
                for wave in [spread_rank(i, len(group))]]
        for _, n, kind, i in tqdm(sorted(todo), desc="bench", unit="prompt"):
            count = len(samples[(kind, n)])
            s = samples[(kind, n)][i]
            base = f"{kind}|{n}|{args.seed}|{count}|{i}"     # depths depend on the count
            wanted = [r for r in rows if not (kind == "perplexity" and r.endswith("| ctx"))]
            missing = {r for r in wanted if f"{row_key(r)}|{base}" not in store}
            if not missing:
                continue
            if kind == "perplexity":
                got = perplexity_trial(model, tokenizer, s.prompt, plans, modes, args.ppl_chunk, missing)
            else:
                kv_file = Path(args.kv_store) / f"{kind}-{n}-{args.seed}-{count}-{i}.safetensors" if args.kv_store else None
                got = retrieval_trial(model, tokenizer, s.prompt, s.answers, KINDS[kind].max_gen_toks, plans, modes,
                                      missing, kv_file)
            for r, value in got.items():
                store[f"{row_key(r)}|{base}"] = value
    seconds = time.perf_counter() - started

    per_prompt, results, prefill = {}, {}, {}
    for n in lengths:
        for kind in kinds:
            count = docs[n] if kind == "perplexity" else trials[n]
            for r in rows:
                if kind == "perplexity" and r.endswith("| ctx"):
                    continue
                found = {i: store.get(f"{row_key(r)}|{kind}|{n}|{args.seed}|{count}|{i}") for i in range(count)}
                found = {i: v for i, v in found.items() if v is not None}
                if not found:
                    continue
                per_prompt[(r, kind, n)] = found
                results[(r, kind, n)] = summarize(kind, list(found.values()))
                times = [v["prefill_s"] for v in found.values() if isinstance(v, dict) and "prefill_s" in v]
                if times:
                    prefill.setdefault((r, n), []).extend(times)
    print(f"\n{model_name}, uniform densities {', '.join(f'{d:g}' for d in densities) or '-'}; "
          f"plans {args.plan}; retrieval trials per length "
          f"{trials}, perplexity documents {docs}; {seconds:.0f} s this run\n")
    def show(r: str, kind: str, n: int) -> str:
        value = results[(r, kind, n)]
        if isinstance(value, tuple):
            return f"{value[0]}/{value[1]}"
        return f"{value:.3f}" + ("" if len(per_prompt[(r, kind, n)]) == docs[n] else
                                 f" ({len(per_prompt[(r, kind, n)])} docs)")

    print("| plan | mode | KV kept at " + ", ".join(map(str, lengths)) + " | "
          + " | ".join(f"{k} {n}" for k in kinds for n in lengths)
          + "".join(f" | prefill s {n}" for n in lengths) + " |")
    print("|---|---|---|" + "---:|" * (len(kinds) * len(lengths) + len(lengths)))
    for r in rows:
        name, mode = (r, "-") if r == "dense" else r.split(" | ")
        spec = "dense" if r == "dense" else plans[name]
        kept = ", ".join(f"{Plan.from_spec(spec, model).density(n):.3f}" for n in lengths)
        cells = [show(r, k, n) if (r, k, n) in results else
                 ("(= dense)" if k == "perplexity" and mode == "ctx" else "-") for k in kinds for n in lengths]
        times = [f"{sum(prefill[(r, n)]) / len(prefill[(r, n)]):.2f}" if (r, n) in prefill else "-" for n in lengths]
        print(f"| {name} | {mode} | {kept} | " + " | ".join(cells) + " | " + " | ".join(times) + " |")
    print("\nTargets at each calibrated row (the open issues' for this model and the row's density; paired with "
          "dense and the nearest uniform row on the prompts all three have):")
    checks = []
    for name, uniform in baseline.items():
        targets = targets_for(args.model, float(plan_density[name]))
        for mode in modes:
            ppl_mode = "dense" if mode == "ctx" else mode
            checks += target_checks(per_prompt, "dense", f"{uniform} | {mode}", f"{name} | {mode}",
                                    [k for k in kinds if k != "perplexity"], lengths, targets)
            if "perplexity" in kinds and mode != "ctx":
                checks += target_checks(per_prompt, "dense", f"{uniform} | {ppl_mode}", f"{name} | {ppl_mode}",
                                        ["perplexity"], lengths, targets)
    for line in checks:
        print(f"- {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            **info, "plans": args.plan, "densities": densities, "trials": trials, "ppl_docs": docs, "modes": modes,
            "results": [{"row": r, "task": k, "length": n, "value": v if not isinstance(v, tuple) else list(v)}
                        for (r, k, n), v in results.items()],
            "prefill_s": {f"{r}|{n}": sum(t) / len(t) for (r, n), t in prefill.items()}, "targets": checks,
            "kv_kept": {name: {str(n): Plan.from_spec(spec, model).density(n) for n in lengths}
                        for name, spec in plans.items()}}, indent=1))


if __name__ == "__main__":
    main()
