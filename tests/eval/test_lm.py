"""The ``headwise`` lm-eval model on the real embedded model (slow): padding-exact batching under
a window plan, plan files, and plans made for another model."""

from __future__ import annotations

import pytest
import torch

from headwise import Plan, PlanError, unpatch_model
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from tests.conftest import make_tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_grad")]


def small_window_plan(model) -> Plan:
    """Elastic windows far shorter than the test contexts (eviction really happens), some dense heads."""
    base = Plan.dense(model)
    layers = []
    for i in range(base.model.num_layers):
        heads = [Window(sink=4, alpha=16.0, beta=0.125), Window(sink=0, alpha=24.0, beta=0.0625),
                 Dense() if i % 3 == 0 else Window(sink=8, alpha=8.0, beta=0.25)]
        layers.append(tuple(heads))
    return Plan(base.model, tuple(layers), {"method": "test"})


@pytest.fixture
def make_lm(real_model):
    from headwise.eval.lm import HeadwiseLM

    model, tokenizer = real_model
    made = []

    def make(plan, batch_size):
        lm = HeadwiseLM(pretrained=model, tokenizer=tokenizer, plan=plan, batch_size=batch_size, device="cpu")
        made.append(lm)
        return lm

    yield make
    if getattr(model, "_headwise", None) is not None:
        unpatch_model(model)


def _text(tokenizer, tokens: int, offset: int) -> str:
    from headwise.data.prose import tokenized_prose

    return tokenized_prose(tokenizer).slice(1000 + offset, tokens)


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _run(make_lm, model, plan, batch_size, method, args):
    lm = make_lm(plan, batch_size)
    try:
        return getattr(lm, method)(_requests(method, args), disable_tqdm=True)
    finally:
        unpatch_model(model)


def test_loglikelihood_batch4_equals_batch1_under_window_plan(real_model, make_lm):
    model, tokenizer = real_model
    plan = small_window_plan(model)
    assert max(plan.kept(200)[1]) < 200 // 2
    args = [(_text(tokenizer, n, 37 * n), " " + _text(tokenizer, 10, 5 * n)) for n in (200, 70, 150, 110)]
    one = _run(make_lm, model, plan, 1, "loglikelihood", args)
    four = _run(make_lm, model, plan, 4, "loglikelihood", args)
    for (a, greedy_a), (b, greedy_b) in zip(one, four):
        assert abs(a - b) < 1e-4
        assert greedy_a == greedy_b
    docs = [(_text(tokenizer, n, 3 * n),) for n in (160, 90)]
    rolling_one = _run(make_lm, model, plan, 1, "loglikelihood_rolling", docs)
    rolling_two = _run(make_lm, model, plan, 2, "loglikelihood_rolling", docs)
    assert max(abs(a - b) for a, b in zip(rolling_one, rolling_two)) < 1e-4


def test_right_padding_needs_the_mask(real_model, make_lm):
    """Without the padding mask a short row's elastic spans would use the padded width: the
    mask the lm-eval model adds changes the result, so the batch test above can fail."""
    model, tokenizer = real_model
    lm = make_lm(small_window_plan(model), 2)
    short, long = (tokenizer(_text(tokenizer, n, n), add_special_tokens=False).input_ids for n in (80, 200))
    batch = torch.zeros(2, len(long), dtype=torch.long)
    batch[0, :len(short)] = torch.tensor(short)
    batch[1] = torch.tensor(long)
    alone = model(input_ids=torch.tensor([short])).logits[0]
    with lm._remember_inputs([(None, short[:1], short[1:] + [5]), (None, long[:1], long[1:] + [5])]):
        masked = lm._model_call(batch)[0, :len(short)]
    unmasked = model(input_ids=batch).logits[0, :len(short)]
    assert torch.allclose(masked, alone, atol=1e-4)
    assert not torch.allclose(unmasked, alone, atol=1e-3)


def _prompts(tokenizer, lengths, max_gen_toks=4):
    gen = {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [(_text(tokenizer, n, 11 * n) + "\n\nSummarize the text above in one line:", dict(gen)) for n in lengths]


def test_greedy_generation_batch4_equals_batch1_left_padding(real_model, make_lm):
    """Fixed windows (beta = 0): one left-padded batch of four prompts of different lengths."""
    model, tokenizer = real_model
    base = small_window_plan(model)
    plan = Plan(base.model, tuple(tuple(Window(h.sink, h.alpha, 0.0) if isinstance(h, Window) else h for h in layer)
                                  for layer in base.layers))
    args = _prompts(tokenizer, (130, 60, 100, 80))
    one = _run(make_lm, model, plan, 1, "generate_until", args)
    four = _run(make_lm, model, plan, 4, "generate_until", args)
    assert one == four
    assert all(len(text) > 0 for text in one)


def test_elastic_plan_generation_batched_equals_single(real_model, make_lm):
    """Elastic spans depend on each prompt's own target length; a mixed batch must not change them."""
    model, tokenizer = real_model
    args = _prompts(tokenizer, (120, 70))
    plan = small_window_plan(model)
    assert _run(make_lm, model, plan, 1, "generate_until", args) == _run(make_lm, model, plan, 2, "generate_until", args)


def test_loads_plan_file_and_rejects_plan_for_another_model(real_model, make_lm, tmp_path):
    from lm_eval.api.registry import get_model

    from headwise.eval.lm import HeadwiseLM
    from headwise.models import embedded_model_dir

    assert get_model("headwise") is HeadwiseLM
    model, tokenizer = real_model
    plan = small_window_plan(model)
    path = tmp_path / "plan.json"
    plan.save(path)
    lm = HeadwiseLM(pretrained=str(embedded_model_dir()), plan=str(path), device="cpu")
    assert lm.plan.layers == plan.layers
    assert lm.model._headwise["runtime"].plan.layers == plan.layers

    other = tmp_path / "other.json"
    Plan.uniform(make_tiny("llama"), 0.25).save(other)
    with pytest.raises(PlanError, match="cannot use plan .*calibrate a plan for this model"):
        make_lm(str(other), 1)
    assert getattr(model, "_headwise", None) is None
