"""Calibrator v2: the local branch, gate training on a model with a planted retrieval head and a
planted local head, determinism, and the combined plan's budget (long heads fixed dense)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from headwise.calibrate.checkpointing import CheckpointPolicy
from headwise.calibrate.gates import (GateSample, dense_targets, gated_loss, local_attention,
                                      train_gates)
from headwise.calibrate.optimize import candidate_grid, long_head_cap, optimize
from headwise.calibrate.select import head_mask
from headwise.kernels.sink_window.naive import sink_window_attention
from headwise.kinds.dense import Dense
from tests.calibrate.test_optimize import INFO, _check_constraints, _synthetic_profiles

VALUE_TOKENS = range(32, 40)     # carry the retrieval marker (hidden dim 50) and their identity
QUERY_TOKEN = 41                 # asks for the value (hidden dim 51)
SINK, WINDOW, T = 4, 32, 192


@pytest.mark.parametrize("T_,sink,window", [(37, 4, 8), (64, 0, 16), (50, 64, 7), (5, 2, 100), (130, 8, 32)])
def test_local_attention_is_the_kernels_sink_window_rule(T_, sink, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, T_, 8, dtype=torch.float64) for _ in range(3))
    out = local_attention(q, k, v, sink, window, 0.3)
    pos = torch.arange(T_).expand(2, -1)
    ref = sink_window_attention(q, k, v, pos, pos[:, None], torch.full((4,), sink), torch.full((2, 4), window), 0.3)
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-5, rtol=1e-5)


def planted_model():
    """One-layer Llama, 4 query / 2 KV heads, MLP off. KV head 0 is a retrieval head: the query
    token's query matches only value tokens' keys (on RoPE's slowest pair, so distance barely
    matters) and it copies the value's identity into the residual. KV head 1 is a local head: a
    large constant query/key on a faster RoPE pair makes it read only the last ~30 tokens."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                     model.model.norm):
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        for t in range(50):
            emb[t, t] = 1.0
        emb[:, 63] = 1.0                       # constant component: drives the local head
        for t in VALUE_TOKENS:
            emb[t, 50] = 1.0
        emb[QUERY_TOKEN, 51] = 1.0
        slow, fast = 7, 5                      # RoPE pairs (i, i + 8) of head_dim 16: i = 7 slowest
        for h in (0, 1):                       # query heads of KV head 0
            attn.q_proj.weight[h * 16 + slow, 51] = 2.0
        attn.k_proj.weight[0 * 16 + slow, 50] = 2.0
        for d, t in enumerate(VALUE_TOKENS):
            attn.v_proj.weight[0 * 16 + d, t] = 1.0
            attn.o_proj.weight[32 + d, 0 * 16 + d] = 3.0
        for h in (2, 3):                       # query heads of KV head 1
            attn.q_proj.weight[h * 16 + fast, 63] = 9.0
        attn.k_proj.weight[1 * 16 + fast, 63] = 9.0
        for d in range(16):
            attn.v_proj.weight[1 * 16 + d, d] = 1.0
            attn.o_proj.weight[d, 2 * 16 + d] = 3.0
        mlp.down_proj.weight.zero_()
    return model


def planted_sequences(count=4, seed=0):
    """``(ids [1, T], at)``: filler tokens, one value token at ``at`` far back (beyond sink + window),
    the query token last."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(3, 32, (1, T), generator=g)
        at = int(torch.randint(SINK + 8, T - WINDOW - 16, (1,), generator=g))
        ids[0, at] = VALUE_TOKENS[i % len(VALUE_TOKENS)]
        ids[0, -1] = QUERY_TOKEN
        out.append((ids, at))
    return out


def planted_samples(model, count=4, seed=0):
    """Gate samples of ``planted_sequences``: the query's final hidden state is matched."""
    positions = torch.tensor([T - 1])
    return [GateSample(ids, positions, dense_targets(model, ids, positions)) for ids, _ in planted_sequences(count, seed)]


def test_planted_heads_do_what_they_are_built_for():
    model = planted_model()
    samples = planted_samples(model)
    # removing the retrieval head (local branch only) breaks the copy; removing the local head does not
    only_retrieval_local = gated_loss(model, samples, np.array([[0.0, 1.0]]), sink=SINK, window=WINDOW)
    only_local_local = gated_loss(model, samples, np.array([[1.0, 0.0]]), sink=SINK, window=WINDOW)
    assert only_retrieval_local > 0.05
    assert only_local_local < 1e-3 * only_retrieval_local
    assert gated_loss(model, samples, np.array([[1.0, 1.0]]), sink=SINK, window=WINDOW) < 1e-10


def test_gates_recover_the_retrieval_head_and_drop_the_local_one():
    model = planted_model()
    samples = planted_samples(model)
    result = train_gates(model, samples, sink=SINK, window=WINDOW, steps=30, lr=0.05, l1=0.05)
    assert result.gates[0, 0] > 0.5, result.gates       # above the selection threshold
    assert result.gates[0, 1] < 0.1, result.gates
    assert result.ranking()[0] == (0, 0)
    assert result.importance[0, 0] > result.importance[0, 1]
    assert model.config._attn_implementation == "sdpa"          # gating is undone


def test_gate_training_is_deterministic():
    model = planted_model()
    samples = planted_samples(model)
    a = train_gates(model, samples, sink=SINK, window=WINDOW, steps=6, seed=3)
    b = train_gates(model, samples, sink=SINK, window=WINDOW, steps=6, seed=3)
    np.testing.assert_array_equal(a.gates, b.gates)
    np.testing.assert_array_equal(a.importance, b.importance)
    assert [r["distill"] for r in a.history] == [r["distill"] for r in b.history]


def test_gradient_checkpointing_changes_no_gate():
    model = planted_model()
    samples = planted_samples(model, count=2)
    runs = [train_gates(model, samples, sink=SINK, window=WINDOW, steps=3, checkpoint=policy)
            for policy in (CheckpointPolicy.named("never", 0), CheckpointPolicy.named("always", 0),
                           CheckpointPolicy(T - 1, memory_guard=False))]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.gates, runs[0].gates)
        np.testing.assert_array_equal(other.importance, runs[0].importance)
    assert not model.training and not model.is_gradient_checkpointing


@pytest.mark.parametrize("tokens,policy,wanted", [
    (4096, CheckpointPolicy(2048, memory_guard=False), True),
    (2048, CheckpointPolicy(2048, memory_guard=False), False),
    (10, CheckpointPolicy.named("always", 2048), True),
    (10**9, CheckpointPolicy.named("never", 2048), False),
    (10**9, CheckpointPolicy.named("auto", 10**10), True),     # the memory guard: ~TBs of activations
    (64, CheckpointPolicy.named("auto", 2048), False),
], ids=["above", "at-threshold", "always", "never", "auto-memory-guard", "auto-short"])
def test_checkpointing_policy(tokens, policy, wanted):
    assert policy.wants(planted_model(), tokens) is wanted


def test_checkpointing_policy_refuses_bad_settings():
    with pytest.raises(ValueError, match="checkpoint threshold must be >= 0"):
        CheckpointPolicy(-1)
    with pytest.raises(ValueError, match="unknown checkpointing policy 'sometimes'"):
        CheckpointPolicy.named("sometimes", 2048)


def test_activation_estimate_matches_the_measured_gate_step():
    from headwise.calibrate.checkpointing import activation_bytes
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30)   # SmolLM2-135M
    model = type("M", (), {"config": smollm2})()
    assert 1.8 * 2**20 < activation_bytes(model, 1) < 2.4 * 2**20                       # 2.1 MiB per token


def test_gating_restores_the_model():
    model = planted_model()
    flags = [p.requires_grad for p in model.parameters()]
    train_gates(model, planted_samples(model, count=1), sink=SINK, window=WINDOW, steps=1)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("density", [0.25, 0.5])
def test_combined_plan_keeps_long_heads_dense_within_budget_at_every_length(density):
    lengths = [256, 512, 1024]
    profiles = _synthetic_profiles(lengths)
    heads = INFO.num_layers * INFO.num_kv_heads
    grid = candidate_grid(lengths, sink=16, alpha_step=64)
    count = long_head_cap(lengths, density, heads, grid)
    assert 0 < count < heads
    ranking = [(l, h) for l in range(INFO.num_layers) for h in range(INFO.num_kv_heads)][::-1]
    long = head_mask(ranking[:count], (INFO.num_layers, INFO.num_kv_heads))
    result = optimize(profiles, INFO, density, grid, holdout=1024, max_configs=2, long_heads=long)
    _check_constraints(result.plan, density, lengths, 2)
    for l, h in zip(*np.nonzero(long)):
        assert isinstance(result.plan.layers[l][h], Dense)
    assert result.plan.calibration["method"] == "gates+milp"
    for n in lengths:
        assert result.plan.density(n) <= density + 1e-9



def test_long_head_cap_is_the_budget_with_the_least_window_candidate():
    # grid at 256/512/1024 with sink 16, alpha step 64: the least window keeps 17 tokens at every length
    lengths, heads = [256, 512, 1024], 8
    cap = long_head_cap(lengths, 0.25, heads, candidate_grid(lengths, sink=16, alpha_step=64))
    assert cap == min(int((0.25 * n * heads - heads * 17) // (n - 17)) for n in lengths)
    guarded = candidate_grid(lengths, sink=16, alpha_step=64, min_span=64)
    assert long_head_cap(lengths, 0.25, heads, guarded) < cap    # guard costs heads
