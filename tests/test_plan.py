import json
import math

import pytest

from headwise.plan import FORMAT, Plan, PlanError, load_plan
from headwise.kinds.dense import Dense
from headwise.kinds.window import Window
from headwise.kinds.rules import span_of
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama")


def test_span_rule_clamps_to_one_and_n():
    assert span_of(-100, 0.0, 50) == 1
    assert span_of(10, 0.0, 5) == 5
    assert span_of(16, 0.125, 800) == 116
    assert span_of(0.0, 0.5, 7) == 3          # floor
    assert Window(sink=4, alpha=10, beta=0).kept(12) == 12    # sink and window overlap
    assert Window(sink=4, alpha=10, beta=0).kept(100) == 14
    assert Dense().kept(77) == 77


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("n", [1024, 2048, 4096, 8192])
def test_uniform_plan_hits_density_at_every_length(model, density, n):
    plan = Plan.uniform(model, density=density, sink=64)
    assert abs(plan.density(n) - density) <= 1 / n


def test_uniform_plan_with_fixed_length_is_streaming_llm(model):
    plan = Plan.uniform(model, density=0.25, sink=16, length=1000)
    head = plan.layers[0][0]
    assert head.beta == 0 and head.kept(1000) == 250 and head.kept(4000) == 250


def test_dense_plan_density_is_one(model):
    assert Plan.dense(model).density(333) == 1.0


def test_densities_per_layer_and_head():
    model = make_tiny("llama")
    plan = Plan.dense(model)
    layers = [list(layer) for layer in plan.layers]
    layers[0][0] = Window(sink=0, alpha=100, beta=0)
    plan = Plan(plan.model, tuple(tuple(layer) for layer in layers))
    assert plan.kept(1000)[0] == [100, 1000]
    assert plan.layer_density(1000) == [0.55, 1.0]
    assert math.isclose(plan.density(1000), (0.1 + 3) / 4)


def test_save_load_roundtrip(tmp_path, model):
    plan = Plan.uniform(model, density=0.25, sink=8)
    path = tmp_path / "plan.json"
    plan.save(path)
    again = load_plan(path, model)
    assert again == plan
    assert json.loads(path.read_text())["format"] == FORMAT


def test_from_spec_forms(tmp_path, model):
    assert Plan.from_spec("dense", model).heads[0] == Dense()
    assert Plan.from_spec("uniform:0.5:8", model).layers[1][1] == Window(sink=8, alpha=-8.0, beta=0.5)
    path = tmp_path / "p.json"
    Plan.uniform(model, 0.25).save(path)
    assert Plan.from_spec(str(path), model).density(4096) == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(PlanError, match="must look like 'uniform' followed by numbers"):
        Plan.from_spec("uniform:abc", model)


def _json(m, **change):
    data = Plan.uniform(m, density=0.25, sink=8).to_json()
    for key, value in change.items():
        data[key] = value
    return data


def _head(model, **fields):
    data = _json(model)
    data["layers"][0]["heads"][0] = {"kind": "window", "sink": 8, "alpha": 4.0, "beta": 0.0, **fields}
    return data


def _load(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return load_plan(path)


@pytest.mark.parametrize("case,expected", [
    ("format", "plan format is 'headwise.plan/0'"),
    ("layers_count", "plan has 1 layers but its model block says 2"),
    ("heads_count", "plan layer 1 has 1 heads but the model has 2 KV heads"),
    ("negative_sink", "field 'sink' must be >= 0"),
    ("nan_alpha", "field 'alpha' must be finite"),
    ("inf_beta", "field 'beta' must be finite"),
    ("beta_above_one", "field 'beta' must be <= 1.0"),
    ("fractional_sink", "field 'sink' must be a whole number"),
    ("string_alpha", "field 'alpha' must be a number"),
    ("unknown_kind", "unknown head kind 'lightningish'"),
    ("missing_field", "missing field(s) ['beta']"),
    ("extra_field", "unknown field(s) ['gamma']"),
    ("sink_too_large", "sink 5000 must be smaller than the model's context of 1024 tokens"),
    ("no_layers", "plan is missing the 'layers' block"),
    ("model_block", "plan 'model' block must have the fields"),
    ("not_json", "is not valid JSON"),
    ("not_object", "a plan must be a JSON object"),
])
def test_malformed_plans_give_their_own_error(tmp_path, model, case, expected):
    data = {
        "format": lambda: _json(model, format="headwise.plan/0"),
        "layers_count": lambda: _json(model, layers=_json(model)["layers"][:1]),
        "heads_count": lambda: _json(model, layers=[_json(model)["layers"][0],
                                                   {"heads": _json(model)["layers"][1]["heads"][:1]}]),
        "negative_sink": lambda: _head(model, sink=-1),
        "nan_alpha": lambda: _head(model, alpha=float("nan")),
        "inf_beta": lambda: _head(model, beta=float("inf")),
        "beta_above_one": lambda: _head(model, beta=1.5),
        "fractional_sink": lambda: _head(model, sink=2.5),
        "string_alpha": lambda: _head(model, alpha="12"),
        "unknown_kind": lambda: _head(model, kind="lightningish"),
        "missing_field": lambda: {**_json(model), "layers": [{"heads": [{"kind": "window", "sink": 1, "alpha": 2}] * 2}] * 2},
        "extra_field": lambda: _head(model, gamma=1),
        "sink_too_large": lambda: _head(model, sink=5000),
        "no_layers": lambda: {k: v for k, v in _json(model).items() if k != "layers"},
        "model_block": lambda: _json(model, model={"name": "x"}),
        "not_json": lambda: "{not json",
        "not_object": lambda: "[1, 2]",
    }[case]()
    with pytest.raises(PlanError) as err:
        _load(tmp_path, data)
    assert expected in str(err.value)
    assert str(err.value).count(". ") == 0 or str(err.value).endswith(".")   # one sentence


def test_plan_for_another_model_is_rejected(tmp_path):
    plan = Plan.uniform(make_tiny("llama"), density=0.25)
    with pytest.raises(PlanError, match="plan was made for model .* calibrate a plan for this model"):
        plan.check_model(make_tiny("qwen2"))


def test_plan_with_other_layer_count_is_rejected():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import TINY
    other = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "num_hidden_layers": 3}))
    with pytest.raises(PlanError, match="plan is for 2 layers x 2 KV heads but the model has 3 x 2"):
        Plan.dense(make_tiny("llama")).check_model(other)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.json")
