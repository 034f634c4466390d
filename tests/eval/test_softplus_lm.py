"""The ``headwise`` lm-eval model with a plan mixing softplus, window and dense heads (slow: real model):
``plan=`` in lm-eval's model arguments loads it, and scores equal ``patch_model`` run directly."""

from __future__ import annotations

import pytest
import torch

from headwise import patch_model, unpatch_model
from headwise.kinds.softplus import Softplus
from headwise.plan import Plan
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_grad")]


def mixed_plan(model) -> Plan:
    """Per layer: exp with re-weighting (p = 3), an elastic window, and LSSA (softplus, log-length scale)
    on every third layer's last head, else dense."""
    base = Plan.dense(model)
    layers = []
    for i in range(base.model.num_layers):
        last = Softplus(nonlinearity="softplus", scale="log", scale_length=64) if i % 3 == 0 else Dense()
        layers.append((Softplus(nonlinearity="exp", scale="none", power=3.0), Window(sink=4, alpha=32.0, beta=0.125),
                       last))
    return Plan(base.model, tuple(layers), {"method": "test"})


def test_plan_argument_runs_a_mixed_softplus_plan(real_model, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    import headwise.eval.lm  # noqa: F401  (registers the "headwise" lm-eval model)
    from headwise.data.prose import tokenized_prose
    from headwise.models import embedded_model_dir

    model, tokenizer = real_model
    plan = mixed_plan(model)
    path = tmp_path / "mixed.json"
    plan.save(path)
    prose = tokenized_prose(tokenizer)
    args = [(prose.slice(2000 + 300 * i, n), " " + prose.slice(2000 + 300 * i + n, 8)) for i, n in enumerate((60, 35))]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    lm = get_model("headwise").create_from_arg_string(
        f"pretrained={embedded_model_dir()},plan={path},device=cpu,batch_size=2")
    assert lm.model._headwise["runtime"].plan.layers == plan.layers
    got = lm.loglikelihood(requests, disable_tqdm=True)
    lm_one = get_model("headwise").create_from_arg_string(f"pretrained={embedded_model_dir()},plan={path},device=cpu")
    one = lm_one.loglikelihood(requests, disable_tqdm=True)
    for (a, _), (b, _) in zip(got, one):
        assert abs(a - b) < 1e-4                                   # right-padded batch of 2 = one at a time

    patch_model(model, plan)                                       # the same numbers straight from patch_model
    try:
        for (context, continuation), (score, _) in zip(args, got):
            ctx = tokenizer(context, add_special_tokens=False).input_ids        # encoded apart, as lm-eval does
            cont = tokenizer(continuation, add_special_tokens=False).input_ids
            inp = torch.tensor([(ctx + cont)[:-1]])                           # lm-eval's input: the last token left out
            logits = model(input_ids=inp).logits[0, len(ctx) - 1:].float()
            direct = logits.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum()
            assert abs(float(direct) - score) < 1e-4
        unpatch_model(model)
        dense = model(input_ids=inp).logits[0, len(ctx) - 1:].float()
        assert abs(float(dense.log_softmax(-1).gather(-1, torch.tensor(cont)[:, None]).sum()) - score) > 1e-3
    finally:
        if getattr(model, "_headwise", None) is not None:
            unpatch_model(model)
