"""The head-kind framework: kinds found in their folders, grouping by attention target, scatter back into head order."""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import headwise.kinds
from headwise import Plan, PlanError, patch_model, unpatch_model
from headwise.engine import LLM
from headwise.kinds import Kind, registry
from headwise.kinds.call import AttentionCall
from headwise.kinds.dense import Dense
from headwise.kinds.layer import LayerKinds
from headwise.kinds.softmax import SoftmaxKVGroup
from headwise.kinds.window import Window


class OtherSoftmaxGroup(SoftmaxKVGroup):
    """The same math as the shared softmax group, under another attention target: a second group."""


@dataclass(frozen=True)
class OtherWindow(Window):
    kind: ClassVar[str] = "window_other_target_test"


OTHER = Kind(name=OtherWindow.kind, spec=OtherWindow, attention=f"{__name__}:OtherSoftmaxGroup")


@pytest.fixture
def other_kind():
    registry.register_kind(OTHER)
    yield
    registry.unregister_kind(OTHER.name)


def _call(B, Q):
    pos = torch.arange(Q).expand(B, Q)
    return AttentionCall(module=None, query_pos=pos, key_pos=pos[:, None], lengths=torch.full((B,), Q), scale=0.25)


def test_every_kind_folder_is_a_registered_kind():
    folders = {m.name for m in pkgutil.iter_modules(headwise.kinds.__path__) if m.ispkg}
    kinds = {k.name for k in registry.all_kinds()}
    assert folders <= kinds and {"window", "dense"} <= kinds
    for kind in registry.all_kinds():
        assert kind.spec.kind == kind.name and "hf" in kind.runtimes
    # window and dense share the softmax group: one group in a layer that mixes them
    assert registry.get("window").attention == registry.get("dense").attention


def test_unknown_kind_is_refused_in_one_sentence():
    with pytest.raises(PlanError, match=r"layer 0 head 1: unknown head kind 'nope'; known kinds are \["):
        registry.get("nope", "layer 0 head 1")


@pytest.mark.parametrize("order", ["other_first", "other_last", "interleaved"])
def test_two_group_layer_scatters_outputs_into_head_order(other_kind, order):
    """Heads split over two groups (same math) equal the one-group layer, head by head."""
    torch.manual_seed(0)
    B, Hkv, G, Q, D = 2, 4, 3, 37, 16
    q = torch.randn(B, Hkv * G, Q, D)
    k, v = torch.randn(B, Hkv, Q, D), torch.randn(B, Hkv, Q, D)
    specs = [Window(sink=2, alpha=5.0), Window(sink=0, alpha=9.0), Window(sink=4, alpha=3.0), Window(sink=1, alpha=7.0)]
    moved = {"other_first": [0], "other_last": [3], "interleaved": [1, 3]}[order]
    mixed = [OtherWindow(**vars(s)) if h in moved else s for h, s in enumerate(specs)]
    one = LayerKinds(0, tuple(specs))
    two = LayerKinds(0, tuple(mixed))
    assert one.single and not two.single and len(two.groups) == 2
    expected = one.attention(q, k, v, _call(B, Q))
    got = two.attention(q, k, v, _call(B, Q))
    assert torch.allclose(got, expected, atol=1e-6)


def test_kind_the_engine_cannot_run_is_refused_in_one_sentence(other_kind, llama):
    """A kind with no ``Kind.engine`` runs under patch_model, and the engine refuses it in one sentence."""
    base = Plan.dense(llama)
    plan = Plan(base.model, (base.layers[0], (OtherWindow(sink=1, alpha=4.0), Dense())))
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    patch_model(llama, plan)
    try:
        with torch.no_grad():
            assert llama(ids).logits.isfinite().all()
    finally:
        unpatch_model(llama)
    with pytest.raises(ValueError, match="the engine cannot run 'window_other_target_test' heads"):
        LLM(llama, plan)
