"""Every public entry refuses a bad input with one sentence: the Python API, the engine (whose bad requests
fail alone while the rest of the batch finishes) and the ``headwise`` command (one line on stderr, exit 2)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from headwise import Plan, expected_length, kv_bytes, load_model, patch_model, unpatch_model
from headwise.engine import LLM, SamplingParams
from headwise.errors import HeadwiseError
from tests.conftest import TINY, make_tiny
from tests.engine.conftest import greedy, random_prompts


def one_sentence(message: str) -> bool:
    """A single line ending with a full stop, with no second sentence in it (no '. ' before a capital)."""
    return "\n" not in message and message.endswith(".") and re.search(r"\. [A-Z]", message) is None


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from headwise.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def other_plan(tmp_path_factory):
    """A plan JSON made for another model (a tiny Llama with 3 layers)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "num_hidden_layers": 3}))
    path = tmp_path_factory.mktemp("plans") / "other.json"
    Plan.dense(other).save(path)
    return path


# ---- the Python API ---------------------------------------------------------------------------------------------
def _patched(model, plan="uniform:0.25:4"):
    patch_model(model, plan)
    return model


API = [
    ("patch_model(model, None)", lambda m, p: patch_model(m, None), "a plan must be a Plan"),
    ("patch_model(None, plan)", lambda m, p: patch_model(None, "dense"), "needs a loaded transformers causal LM"),
    ("patch_model(str, plan)", lambda m, p: patch_model("llama", "dense"), "needs a loaded transformers causal LM"),
    ("patch_model backend", lambda m, p: patch_model(m, "dense", backend="gpu"), "backend must be one of"),
    ("patch_model target_length 0", lambda m, p: patch_model(m, "dense", target_length=0),
     "target_length must be between 1"),
    ("patch_model target_length 1e9", lambda m, p: patch_model(m, "dense", target_length=10**9),
     "16 x the model's context of 1024 tokens"),
    ("patch_model prefill", lambda m, p: patch_model(m, "dense", prefill="fast"), "prefill must be one of"),
    ("patch_model unknown preset", lambda m, p: patch_model(m, "sparse:0.3"), "'sparse:0.3'"),
    ("patch_model preset argument", lambda m, p: patch_model(m, "uniform:x"), "followed by numbers"),
    ("patch_model missing plan file", lambda m, p: patch_model(m, "no-such-plan.json"), "does not exist"),
    ("patch_model plan is a folder", lambda m, p: patch_model(m, str(p.parent)), "is a directory; give a plan JSON"),
    ("patch_model plan of another model", lambda m, p: patch_model(m, str(p)), "calibrate a plan for this model"),
    ("patch_model twice", lambda m, p: patch_model(_patched(m), "dense"), "already patched"),
    ("unpatch_model unpatched", lambda m, p: unpatch_model(m), "not patched"),
    ("expected_length unpatched", lambda m, p: expected_length(m, 100).__enter__(), "needs a model patched"),
    ("expected_length 10**9", lambda m, p: expected_length(_patched(m), 10**9).__enter__(),
     "must be between 1 and 16 x the model's context"),
    ("expected_length 0", lambda m, p: expected_length(_patched(m), 0).__enter__(), "must be between 1"),
    ("expected_length 2.5", lambda m, p: expected_length(_patched(m), 2.5).__enter__(), "whole number of tokens"),
    ("patched generate, empty prompt", lambda m, p: _patched(m).generate(torch.zeros((1, 0), dtype=torch.long),
                                                                        max_new_tokens=2), "the input is empty"),
    ("patched forward, empty row", lambda m, p: _patched(m)(input_ids=torch.tensor([[5, 6], [7, 8]]),
                                                            attention_mask=torch.tensor([[1, 1], [0, 0]])),
     "sequence 1 of the batch has no tokens"),
    ("kv_bytes(None)", lambda m, p: kv_bytes(None), "kv_bytes needs a transformers Cache"),
    ("load_model missing folder", lambda m, p: load_model("/no/such/checkpoint"), "does not exist"),
]


@pytest.mark.parametrize("call, message", [(c, m) for _, c, m in API], ids=[n for n, _, _ in API])
def test_api_refuses_with_one_sentence(call, message, other_plan):
    model = make_tiny("llama")
    try:
        with pytest.raises((HeadwiseError, RuntimeError, FileNotFoundError)) as info:
            call(model, other_plan)
    finally:
        if getattr(model, "_headwise", None) is not None:
            unpatch_model(model)
    assert message in str(info.value) and one_sentence(str(info.value)), str(info.value)


def test_length_beyond_the_context_warns_once_per_length(caplog, monkeypatch):
    """A length past the context (softplus heads run there on purpose) is a warning, said once per length."""
    import headwise.patches

    monkeypatch.setattr(headwise.patches, "_WARNED", set())          # whatever earlier tests warned about
    model = patch_model(make_tiny("llama"), "dense")
    try:
        with caplog.at_level("WARNING", logger="headwise"):
            for n in (1500, 1500, 1700, 1500):
                with expected_length(model, n):
                    pass
    finally:
        unpatch_model(model)
    said = [r.getMessage() for r in caplog.records if "beyond the model's context" in r.getMessage()]
    assert said == [f"headwise: expected_length's n of {n} tokens is beyond the model's context of 1024 tokens."
                    for n in (1500, 1700)]


# ---- the engine: the LLM call itself ----------------------------------------------------------------------------
ENGINE_CALLS = [
    ("LLM(42)", lambda m: LLM(42), "LLM's model must be None"),
    ("LLM plan None", lambda m: LLM(m, plan=None), "a plan must be a Plan"),
    ("LLM kv_cache_memory text", lambda m: LLM(m, kv_cache_memory="lots"), "is not a size"),
    ("LLM kv_cache_memory tiny", lambda m: LLM(m, kv_cache_memory=100), "holds no 16-token block"),
    ("LLM block_size 0", lambda m: LLM(m, block_size=0), "block_size must be a positive whole number"),
    ("LLM max_num_seqs -1", lambda m: LLM(m, max_num_seqs=-1), "max_num_seqs must be a positive whole number"),
    ("LLM dtype", lambda m: LLM(m, dtype="int8"), "dtype must be float32, bfloat16 or float16"),
    ("LLM backend", lambda m: LLM(m, backend="gpu"), "backend must be one of"),
    ("LLM prefill", lambda m: LLM(m, prefill="fast"), "prefill must be one of"),
    ("LLM patched model", lambda m: LLM(_patched(m)), "pass the unpatched model"),
    ("generate params count", lambda m: LLM(m, kv_cache_memory="4MiB").generate(
        [{"prompt_token_ids": [5, 6]}] * 2, [greedy(2)] * 3, use_tqdm=False), "got 3 SamplingParams for 2 prompts"),
    ("chat nothing", lambda m: LLM(m, kv_cache_memory="4MiB").chat([], use_tqdm=False), "chat takes a conversation"),
]


@pytest.mark.parametrize("call, message", [(c, m) for _, c, m in ENGINE_CALLS], ids=[n for n, _, _ in ENGINE_CALLS])
def test_engine_calls_refuse_with_one_sentence(call, message):
    model = make_tiny("llama")
    try:
        with pytest.raises(HeadwiseError) as info:
            call(model)
    finally:
        if getattr(model, "_headwise", None) is not None:
            unpatch_model(model)
    assert message in str(info.value) and one_sentence(str(info.value)), str(info.value)


# ---- the engine: one bad request among good ones ----------------------------------------------------------------
GOOD = random_prompts((25, 40), seed=31)

REQUESTS = [   # (name, prompt, params or None for greedy(5), whether the engine has a tokenizer, sentence)
    ("empty token ids", {"prompt_token_ids": []}, None, False, "the prompt is empty"),
    ("empty text", "", None, True, "the prompt is empty"),
    ("token outside the vocabulary", {"prompt_token_ids": [5, 999]}, None, False, "outside the model's vocabulary"),
    ("token ids not numbers", {"prompt_token_ids": [5, "x"]}, None, False, "list of whole numbers"),
    ("prompt of another type", 42, None, False, "a prompt must be text"),
    ("text without a tokenizer", "hello", None, False, "text prompts need a tokenizer"),
    ("chat without a tokenizer", {"messages": [{"role": "user", "content": "hi"}]}, None, False,
     "chat needs a tokenizer"),
    ("empty conversation", {"messages": []}, None, True, "a conversation must be a non-empty list"),
    ("message without content", {"messages": [{"role": "user"}]}, None, True, "message 0 of the conversation"),
    ("prompt beyond the context", {"prompt_token_ids": list(range(3, 100)) * 12}, None, False, "model's context"),
    ("n=2", GOOD[0], SamplingParams(n=2), False, "SamplingParams.n must be 1"),
    ("logprobs", GOOD[0], SamplingParams(logprobs=1), False, "SamplingParams.logprobs is not supported"),
    ("best_of", GOOD[0], SamplingParams(best_of=3), False, "SamplingParams.best_of is not supported"),
    ("unknown dict field", GOOD[0], {"max_tokens": 3, "beam_width": 2}, False, "has no field 'beam_width'"),
    ("params of another type", GOOD[0], "greedy", False, "sampling params must be SamplingParams or a dict"),
    ("max_tokens 0", GOOD[0], SamplingParams(max_tokens=0), False, "SamplingParams.max_tokens"),
    ("min_tokens above max_tokens", GOOD[0], SamplingParams(max_tokens=4, min_tokens=9), False,
     "min_tokens (9) must be at most max_tokens (4)"),
    ("temperature -1", GOOD[0], {"temperature": -1.0}, False, "SamplingParams.temperature"),
    ("top_p 0", GOOD[0], SamplingParams(top_p=0.0), False, "SamplingParams.top_p must be in (0, 1]"),
    ("min_p 2", GOOD[0], SamplingParams(min_p=2.0), False, "SamplingParams.min_p must be in [0, 1]"),
    ("repetition_penalty 0", GOOD[0], SamplingParams(repetition_penalty=0.0), False, "repetition_penalty"),
    ("presence_penalty 3", GOOD[0], SamplingParams(presence_penalty=3.0), False, "presence_penalty must be in [-2, 2]"),
    ("empty stop string", GOOD[0], SamplingParams(stop=[""]), False, "SamplingParams.stop"),
    ("negative stop token", GOOD[0], SamplingParams(stop_token_ids=[-3]), False, "SamplingParams.stop_token_ids"),
]


@pytest.fixture(scope="module")
def engines(tokenizer):
    model = make_tiny("llama")
    plain = LLM(model, plan="uniform:0.5:4", kv_cache_memory="8MiB")
    with_tokenizer = LLM(model, plan="uniform:0.5:4", tokenizer=tokenizer, kv_cache_memory="8MiB")
    alone = [plain.generate([{"prompt_token_ids": p}], greedy(5), use_tqdm=False)[0].outputs[0].token_ids
             for p in GOOD]
    return plain, with_tokenizer, alone


@pytest.mark.parametrize("prompt, params, tokenized, message", [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_a_bad_request_fails_alone_with_one_sentence(engines, prompt, params, tokenized, message):
    plain, with_tokenizer, alone = engines
    llm = with_tokenizer if tokenized else plain
    if not isinstance(prompt, (str, dict, int)):
        prompt = {"prompt_token_ids": prompt}
    outs = llm.generate([{"prompt_token_ids": GOOD[0]}, prompt, {"prompt_token_ids": GOOD[1]}],
                        [greedy(5), greedy(5) if params is None else params, greedy(5)], use_tqdm=False)
    bad = outs[1]
    assert bad.error is not None and message in bad.error and one_sentence(bad.error), bad.error
    assert bad.outputs[0].finish_reason == "error" and bad.finished
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone      # the others finish as alone
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_streamed_batch_with_a_bad_request(engines):
    plain, _, alone = engines
    events = list(plain.stream([{"prompt_token_ids": GOOD[0]}, {"prompt_token_ids": []},
                                {"prompt_token_ids": GOOD[1]}], greedy(5)))
    assert [e.finish_reason for e in events if e.index == 1] == ["error"]
    assert [[e.token_id for e in events if e.index == i] for i in (0, 2)] == alone


# ---- the command ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, other_plan):
    """A tiny checkpoint with the real tokenizer, and the bad files the command lines below point at."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("cli")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "folder").mkdir()
    (root / "bad.json").write_text("{not json")
    (root / "bad.jsonl").write_text(json.dumps({"prompt": "fine"}) + "\n{broken\n")
    (root / "fields.jsonl").write_text(json.dumps({"text": "no prompt field"}) + "\n")
    return {"tiny": str(root / "tiny"), "folder": str(root / "folder"), "bad_json": str(root / "bad.json"),
            "bad_jsonl": str(root / "bad.jsonl"), "fields_jsonl": str(root / "fields.jsonl"),
            "other_json": str(other_plan), "missing": str(root / "missing.txt")}


GEN = ["generate", "--model", "{tiny}", "--max-tokens", "2", "--kv-cache-memory", "16MiB"]
COMMANDS = [
    ("plan is a folder", GEN + ["--plan", "{folder}", "--prompt", "hi"], "is a directory; give a plan JSON file"),
    ("plan is not JSON", GEN + ["--plan", "{bad_json}", "--prompt", "hi"], "is not valid JSON"),
    ("plan of another model", GEN + ["--plan", "{other_json}", "--prompt", "hi"], "calibrate a plan for this model"),
    ("plan preset arguments", GEN + ["--plan", "uniform:x", "--prompt", "hi"], "followed by numbers"),
    ("missing prompt file", GEN + ["--prompt-file", "{missing}"], "does not exist; check the path"),
    ("prompt file is a folder", GEN + ["--prompt-file", "{folder}"], "is a directory; give a file"),
    ("prompt file bad JSON line", GEN + ["--prompt-file", "{bad_jsonl}"], "line 2 is not valid JSON"),
    ("prompt file without prompts", GEN + ["--prompt-file", "{fields_jsonl}"], "has none of 'prompt'"),
    ("no prompts", GEN, "give prompts with --prompt"),
    ("threads 0", GEN + ["--prompt", "hi", "--threads", "0"], "--threads must be at least 1"),
    ("missing model folder", ["generate", "--model", "{missing}", "--prompt", "hi"], "does not exist"),
    ("negative temperature", GEN + ["--prompt", "hi", "--temperature", "-1"], "SamplingParams.temperature"),
    ("stream two prompts", GEN + ["--prompt", "a", "--prompt", "b", "--stream"], "got 2 prompts"),
    ("system without chat", GEN + ["--prompt", "a", "--system", "be brief"], "--system needs --chat"),
    ("unknown backend", GEN + ["--prompt", "hi", "--backend", "gpu"], "backend must be one of"),
    ("pool size", GEN + ["--prompt", "hi", "--kv-cache-memory", "lots"], "is not a size"),
    ("plan show missing", ["plan", "show", "{missing}"], "does not exist"),
    ("plan show folder", ["plan", "show", "{folder}"], "is a directory; give a plan JSON file"),
    ("eval unknown task", ["eval", "--tasks", "passkey,nope"], "unknown task(s) ['nope']"),
    ("calibrate density", ["calibrate", "--density", "2", "--out", "{missing}"], "--density must be in (0, 1]"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_command_prints_one_line_and_exits_2(files, capsys, argv, message):
    from headwise.cli import main

    rc = main([a.format(**files) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("headwise")]
    assert rc == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and message in lines[0] and one_sentence(lines[0]), err


def test_debug_shows_the_error_itself(files):
    from headwise.cli import main

    with pytest.raises(FileNotFoundError):
        main(["--debug", *[a.format(**files) for a in GEN], "--prompt-file", files["missing"]])
    with pytest.raises(FileNotFoundError):
        main([*[a.format(**files) for a in GEN], "--prompt-file", files["missing"], "--debug"])


def test_version_and_defaults_in_help(capsys):
    from headwise import __version__
    from headwise.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"headwise {__version__}"
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    text = generate.format_help()
    assert f"(default: {SamplingParams().max_tokens})" in text and f"(default: {SamplingParams().temperature})" in text
    defaults = {a.dest: a.default for a in generate._actions}
    fields = SamplingParams()
    assert all(defaults[name] == getattr(fields, name) for name in
               ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                "presence_penalty", "frequency_penalty"))
