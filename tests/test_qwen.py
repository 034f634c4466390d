"""The second model, Qwen2.5-Coder-0.5B-Instruct (opt-in: ``make fetch-models``; skipped when absent).

Its shapes differ from SmolLM2's everywhere headwise could have assumed them: 24 layers, 14 query /
2 KV heads (7 queries per KV head), q/k/v biases, an untied output head, a 151,936-token vocabulary
and a 32k context. Here: patch_model (dense bit-exact, windows equal an independent reference, the
cpu kernels equal naive), the engine (incl. the lean decode path), lm-eval and ``plan show``. The
vLLM plugin on it is in ``tests/integrations/test_vllm_qwen.py``. Prompts stay short (<= 1k tokens)
so that each test takes seconds to a minute on 2 cores.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AttentionInterface

from headwise import Plan, kv_bytes, patch_model, unpatch_model
from headwise.kinds.dense import Dense
from tests.engine.conftest import greedy, hf_greedy

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture
def qwen(qwen_model):
    model, tokenizer = qwen_model
    yield model, tokenizer
    if getattr(model, "_headwise", None):
        unpatch_model(model)


@pytest.fixture(scope="module")
def prose(qwen_model):
    """``prose(n, offset)``: ``n`` token ids of English prose (CPython's pydoc topics). No BOS: the
    Qwen tokenizer adds none (``add_bos_token`` is false, as upstream)."""
    import pydoc_data.topics as topics

    _, tokenizer = qwen_model
    text = " ".join(topics.topics[k] for k in sorted(topics.topics))[:60_000]
    ids = tokenizer(text).input_ids
    return lambda n, offset=0: ids[offset: offset + n]


def test_loaded_model_is_the_registry_entry(qwen):
    model, tokenizer = qwen
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (24, 14, 2)
    assert model.model.layers[0].self_attn.head_dim == 64       # config.json has no head_dim: hidden / heads
    assert c.max_position_embeddings == 32768 and c.rope_parameters["rope_theta"] == 1e6
    assert not c.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)) and attn.o_proj.bias is None
    ids = tokenizer("The capital of France is").input_ids
    assert tokenizer.bos_token_id not in ids and not tokenizer.add_bos_token
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
    eos = model.generation_config.eos_token_id                 # as upstream: <|im_end|> and <|endoftext|>
    assert set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])) <= set(eos)
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, len(ids):]).startswith(" Paris")


def test_dense_plan_is_bit_exact(qwen, prose):
    model, _ = qwen
    x = torch.tensor([prose(300)])
    expected = model(input_ids=x).logits
    expected_tokens = hf_greedy(model, prose(120, 500), 8)
    patch_model(model, "dense")
    assert torch.equal(model(input_ids=x).logits, expected)
    unpatch_model(model)
    assert hf_greedy(model, prose(120, 500), 8, plan="dense") == expected_tokens


def reference_logits(model, plan: Plan, input_ids: torch.Tensor) -> torch.Tensor:
    """Eager attention with each head's causal sink + window mask written out here (no headwise code)."""
    n = input_ids.shape[1]

    def attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        B, H, Q, D = query.shape
        G = H // key.shape[1]
        i, j = torch.arange(Q)[:, None], torch.arange(key.shape[2])[None, :]
        out = torch.empty_like(query)
        for h in range(H):
            spec = plan.layers[module.layer_idx][h // G]
            mask = j <= i
            if not isinstance(spec, Dense):
                mask = mask & ((j < spec.sink) | (j > i - spec.span(n)))
            scores = (query[:, h] @ key[:, h // G].transpose(-1, -2)) * scaling
            out[:, h] = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value[:, h // G]
        return out.transpose(1, 2), None

    AttentionInterface.register("headwise_test_qwen_reference", attention)
    model.set_attn_implementation("headwise_test_qwen_reference")
    try:
        return model(input_ids=input_ids).logits
    finally:
        model.set_attn_implementation("sdpa")


def test_uniform_window_plan_equals_reference(qwen, prose):
    model, _ = qwen
    plan = Plan.uniform(model, density=0.25, sink=4)
    x = torch.tensor([prose(256, 1000)])
    assert max(plan.kept(256)[1]) < 100                       # windows really cut the 256-token prompt
    expected = reference_logits(model, plan, x)
    patch_model(model, plan)
    got = model(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=5e-4, rtol=1e-4)


def test_cpu_kernels_equal_naive_with_cache_and_decode(qwen):
    """A left-padded batch and three decode steps through the headwise cache: cpu == naive kernels."""
    from tests.kernels.test_patched_model_backends import mixed_plan, prose_batch, run

    model, tokenizer = qwen
    input_ids, mask = prose_batch(tokenizer, [400, 250])
    plan = mixed_plan(model)
    naive = run(model, plan, "naive", input_ids, mask, use_cache=True)
    fast = run(model, plan, "cpu", input_ids, mask, use_cache=True)
    real = mask.bool()
    torch.testing.assert_close(fast[0][real], naive[0][real], atol=2e-3, rtol=1e-3)
    for got, expected in zip(fast[1:], naive[1:]):
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)
        assert torch.equal(got[:, -1].argmax(-1), expected[:, -1].argmax(-1))


def test_kept_kv_follows_the_density(qwen, prose):
    model, _ = qwen
    x = torch.tensor([prose(1024)])
    c = model.config
    dense = 2 * c.num_hidden_layers * c.num_key_value_heads * 64 * x.shape[1] * 4
    patch_model(model, Plan.uniform(model, density=0.25, sink=64))
    used = kv_bytes(model(input_ids=x, use_cache=True, logits_to_keep=1).past_key_values)
    assert 0.2 * dense <= used["kept"] <= 0.3 * dense


def test_lean_forward_equals_hf_forward(qwen, prose):
    """The lean decode forward with Qwen2's q/k/v biases and untied head: same logits as HF."""
    import torch.nn.functional as F

    from headwise.engine.lean import LeanDecoder, lean_decoder

    model, _ = qwen
    lean = lean_decoder(model)
    assert isinstance(lean, LeanDecoder)
    ids = torch.tensor(prose(6, 2000))
    positions = torch.arange(40, 46)
    rows = torch.tensor([5, 2])

    def causal(layer, q, k, v, scale):
        group = q.shape[0] // k.shape[0]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0),
                                              is_causal=True, scale=scale).transpose(0, 1)

    ref = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0, rows]
    got = lean.forward(ids, positions, rows, causal)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("plan", ["dense", "uniform:0.25"])
def test_engine_equals_patched_hf_on_the_lean_path(qwen, prose, plan, caplog):
    from headwise.engine import LLM

    model, tokenizer = qwen
    prompts = [prose(37, 3000), prose(250, 4000), prose(600, 5000)]
    with caplog.at_level(logging.INFO, logger="headwise.engine"):
        llm = LLM(model, plan=plan, tokenizer=tokenizer, kv_cache_memory="512MiB", max_num_batched_tokens=1024)
    assert "run the lean Qwen2ForCausalLM forward" in caplog.text
    lean_calls = []
    forward = llm.runner.lean.forward
    llm.runner.lean.forward = lambda *a, **k: lean_calls.append(1) or forward(*a, **k)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(8), use_tqdm=False)
    assert len(lean_calls) >= 7                                  # the decode steps ran the lean forward
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model, p, 8, plan=None if plan == "dense" else plan), len(p)
    assert llm.blocks.num_free == llm.blocks.num_blocks
    if plan != "dense":
        assert llm.last_stats.peak_kv_bytes < 0.45 * llm.last_stats.dense_kv_bytes


def test_lm_eval_loglikelihood_equals_the_patched_model(qwen, prose):
    """lm-eval's headwise model: a right-padded batch of two requests scores what the patched model
    gives each request alone."""
    from lm_eval.api.instance import Instance

    from headwise.eval.lm import HeadwiseLM

    model, tokenizer = qwen
    texts = [tokenizer.decode(prose(n, off)) for n, off in ((240, 6000), (160, 7000))]
    requests = [(t[: len(t) * 9 // 10], t[len(t) * 9 // 10:]) for t in texts]
    lm = HeadwiseLM(pretrained=model, tokenizer=tokenizer, plan="uniform:0.25", batch_size=2, device="cpu")
    try:
        got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i)
                                for i, r in enumerate(requests)], disable_tqdm=True)
        for (context, continuation), (score, is_greedy) in zip(requests, got):
            ctx, cont = lm._encode_pair(context, continuation)
            assert len(cont) >= 5
            logits = model(input_ids=torch.tensor([(ctx + cont)[:-1]])).logits[0, -len(cont):].log_softmax(-1)
            target = torch.tensor(cont)
            assert abs(score - float(logits.gather(-1, target[:, None]).sum())) < 1e-3
            assert is_greedy == bool((logits.argmax(-1) == target).all())
    finally:
        unpatch_model(model)


def test_plan_show_on_a_uniform_plan(qwen, tmp_path, capsys):
    from headwise.cli import main

    model, _ = qwen
    path = tmp_path / "qwen-uniform25.json"
    Plan.uniform(model, density=0.25).save(path)
    assert main(["plan", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model Qwen2.5-Coder-0.5B-Instruct, 24 layers x 2 KV heads" in out
    rows = {int(line.split()[0]): float(line.split()[1]) for line in out.splitlines()
            if line.strip() and line.split()[0].isdigit() and len(line.split()) == 2}
    assert sorted(rows) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert abs(rows[32768] - 0.25) < 0.01
    assert path.with_suffix(".png").stat().st_size > 1000
