"""The head-kind framework: grouping by family, scatter back into head order, kind folders register."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from headwise import Plan, patch_model
from headwise.kinds.base import FAMILIES, AttentionCall, register_family
from headwise.kinds.layer import LayerKinds
from headwise.kinds.window import SoftmaxKVGroup
from headwise.plan import HEAD_KINDS, Dense, PlanError, Window, register_head_kind


@dataclass(frozen=True)
class OtherWindow(Window):
    """A window head in another family: makes a layer run two groups with the same math."""

    kind: ClassVar[str] = "window_other_family_test"
    family: ClassVar[str] = "sink_window_other_test"


@pytest.fixture
def other_family():
    register_head_kind(OtherWindow)
    register_family(OtherWindow.family, SoftmaxKVGroup)
    yield
    HEAD_KINDS.pop(OtherWindow.kind)
    FAMILIES.pop(OtherWindow.family)


def _call(B, Q):
    pos = torch.arange(Q).expand(B, Q)
    return AttentionCall(module=None, query_pos=pos, key_pos=pos[:, None], lengths=torch.full((B,), Q), scale=0.25)


def test_builtin_kinds_are_registered_from_their_folders():
    assert {"window", "dense"} <= set(HEAD_KINDS)
    assert FAMILIES["sink_window"] is SoftmaxKVGroup


@pytest.mark.parametrize("order", ["other_first", "other_last", "interleaved"])
def test_two_family_layer_scatters_outputs_into_head_order(other_family, order):
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


def test_kind_without_an_implementation_is_refused_in_one_sentence(llama):
    @dataclass(frozen=True)
    class Orphan(Dense):
        kind: ClassVar[str] = "orphan_test"
        family: ClassVar[str] = "no_such_family"

    register_head_kind(Orphan)
    try:
        base = Plan.dense(llama)
        plan = Plan(base.model, (base.layers[0], (Orphan(), Dense())))
        with pytest.raises(PlanError, match="layer 1 head 0: head kind 'orphan_test' has no attention implementation"):
            patch_model(llama, plan)
    finally:
        HEAD_KINDS.pop("orphan_test")
