"""The window span floor ``min_span``: ``span(N) = clamp(floor(alpha + beta*N), max(1, min_span), N)``.

Every consumer of a head's KV rule must honour it: the spec, the tensor rule the HF runtime, the
kernels and the vLLM plugin read (``LayerRule``), the engine's block layout, the vLLM block freeing
(``kv_memory``), and the calibrator's band geometry. The runtime tests compare a floored elastic
plan with the fixed window it equals at short lengths, and with the same plan without the floor
(a one-token window), so a runtime that drops the floor fails.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from headwise import Plan, patch_model, unpatch_model
from headwise.errors import PlanError
from headwise.kinds.kv_rule import LayerRule
from headwise.kinds.rules import KVRule, as_rule, span_of
from headwise.kinds.window import Window
from headwise.plan import ModelInfo
from tests.conftest import make_tiny

# at N <= 120: alpha + beta*N <= -340, so the floor (9) decides; a fixed 9-token window is the same head
FLOORED = Window(sink=2, alpha=-400.0, beta=0.5, min_span=9)
FIXED = Window(sink=2, alpha=9.0, beta=0.0)
UNFLOORED = Window(sink=2, alpha=-400.0, beta=0.5)


def test_span_rule_with_a_floor():
    assert [FLOORED.span(n) for n in (1, 5, 9, 100, 800, 1000)] == [1, 5, 9, 9, 9, 100]
    assert UNFLOORED.span(100) == 1 and FLOORED.kept(100) == 11 and FLOORED.kept(6) == 6
    assert span_of(-400.0, 0.5, 100, 9) == 9 and span_of(-400.0, 0.5, 100) == 1
    assert FLOORED.kv_rule() == KVRule(2, -400.0, 0.5, False, 9)
    assert as_rule((0, 0.0, 0.0, True)) == KVRule(0, 0.0, 0.0, True, 0)      # a kind's plain 4-tuple
    assert as_rule(FLOORED.kv_rule()).span(100) == 9


def test_layer_rule_spans_equal_the_specs():
    heads = (FLOORED, UNFLOORED, FIXED, Window(sink=0, alpha=-64.0, beta=0.25, min_span=40))
    rule = LayerRule.from_heads(heads)
    lengths = torch.tensor([1, 7, 50, 100, 300, 800, 2000])
    expected = [[h.span(int(n)) for h in heads] for n in lengths]
    assert rule.span(lengths).tolist() == expected
    assert rule.select([0, 3]).span(lengths).tolist() == [[row[0], row[3]] for row in expected]
    assert rule.to(torch.device("cpu")).span(lengths).tolist() == expected


def test_plan_json_keeps_old_plans_and_writes_the_floor_only_when_set():
    assert "min_span" not in FIXED.to_json() and FLOORED.to_json()["min_span"] == 9
    old = {"kind": "window", "sink": 2, "alpha": 9.0, "beta": 0.0}          # a plan written before the floor
    assert Window.from_json(old, "here") == FIXED
    assert Window.from_json(FLOORED.to_json(), "here") == FLOORED
    with pytest.raises(PlanError, match="min_span"):
        Window(sink=2, alpha=1.0, beta=0.0, min_span=-1).validate("here")
    with pytest.raises(PlanError, match="min_span"):
        Window(sink=2, alpha=1.0, beta=0.0, min_span=5000).validate("here", max_length=1024)


def _plan(model, head: Window) -> Plan:
    info = ModelInfo.of(model)
    return Plan(info, tuple((head,) * info.num_kv_heads for _ in range(info.num_layers)), {"method": "test"})


def _logits(model, plan, ids, backend):
    patch_model(model, plan, backend=backend, prefill="sparse")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            logits = [out.logits]
            cache = out.past_key_values
            for _ in range(3):                                    # decode through the headwise cache
                out = model(input_ids=logits[-1][:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
                logits.append(out.logits)
    finally:
        unpatch_model(model)
    return torch.cat(logits, dim=1)


BACKENDS = ["naive", "cpu"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_patched_model_honours_the_floor(arch, backend):
    model = make_tiny(arch)
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    floored = _logits(model, _plan(model, FLOORED), ids, backend)
    fixed = _logits(model, _plan(model, FIXED), ids, backend)
    torch.testing.assert_close(floored, fixed)
    assert not torch.allclose(floored, _logits(model, _plan(model, UNFLOORED), ids, backend), atol=1e-3)


def test_engine_honours_the_floor():
    from headwise.engine import LLM, SamplingParams
    from headwise.engine.layout import head_layout

    assert head_layout(FLOORED, 100, 8).span == 9 and head_layout(UNFLOORED, 100, 8).span == 1
    model = make_tiny("qwen2")
    prompts = [[(7 * i + 3) % 125 + 3 for i in range(n)] for n in (90, 40)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def tokens(head):
        llm = LLM(model, plan=_plan(model, head), kv_cache_memory="8MiB", block_size=8)
        return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                             use_tqdm=False)]

    floored = tokens(FLOORED)
    assert floored == tokens(FIXED)
    assert floored != tokens(UNFLOORED)


def test_vllm_block_freeing_honours_the_floor():
    from headwise.integrations.vllm.kv_memory import layer_keep

    keep = layer_keep((FLOORED,), prefill_dense=False)
    assert keep.span(100) == 9 == layer_keep((FIXED,), False).span(100)
    # a decode at position 99 reads 91..99: nothing past the sink block below 91 may be kept, nothing above freed
    assert keep.first_kept(99, 10) == 91
    assert layer_keep((UNFLOORED,), False).first_kept(99, 10) == 99


def test_calibrator_band_honours_the_floor():
    from headwise.calibrate.optimize import band, dropped_fraction

    assert band(FLOORED.kv_rule(), 100) == (2, 9) == band(FIXED.kv_rule(), 100)
    assert (dropped_fraction(FLOORED, 128, 64) == dropped_fraction(FIXED, 128, 64)).all()
    assert json.dumps(FLOORED.to_json())                      # plain JSON
