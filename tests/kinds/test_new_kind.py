"""A new head kind is a new folder and nothing else.

The test writes a toy kind, "sink only" (a head that reads its first ``sink`` tokens and the current
one), as a folder in a temporary directory with its own spec, attention and engine group, puts that
directory on ``headwise.kinds.__path__`` (as if the folder sat beside the built-in kinds), and runs
it through a plan round-trip, ``patch_model``, the engine and ``headwise plan show`` with no edit
anywhere else. Its output must equal the built-in window rule that keeps the same tokens.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import headwise.kinds
from headwise import Plan, load_plan, patch_model, unpatch_model
from headwise.kinds import registry
from headwise.kinds.window import Window
from headwise.plan import ModelInfo
from tests.engine.conftest import assert_engine_equals_patched_hf, random_prompts

FILES = {
    "__init__.py": '''
        """``sink_only`` kind (a test's toy): the first ``sink`` tokens and the current one."""
        from headwise.kinds.base import Kind
        from .spec import SinkOnly

        KIND = Kind(name="sink_only", spec=SinkOnly, attention="headwise.kinds.sink_only.attention:SinkOnlyGroup",
                    engine="headwise.kinds.sink_only.engine:SinkOnlyEngineGroup", mark="O",
                    description="the first `sink` tokens and the current one")
    ''',
    "spec.py": '''
        from dataclasses import dataclass
        from typing import ClassVar

        from headwise.kinds.base import HeadSpec
        from headwise.kinds.rules import check_number


        @dataclass(frozen=True)
        class SinkOnly(HeadSpec):
            kind: ClassVar[str] = "sink_only"
            sink: int = 4

            def kept(self, n):
                return min(n, self.sink + 1)

            def kv_rule(self):
                return self.sink, 1.0, 0.0, False          # the cache keeps the sink and the newest token

            def validate(self, where, max_length=None):
                check_number(where, "sink", self.sink, minimum=0, integer=True)
    ''',
    "attention.py": '''
        import torch


        class SinkOnlyGroup:
            state_key = None

            def __init__(self, layer_idx, heads, specs, weights):
                self.heads = tuple(heads)
                self.sink = torch.tensor([s.sink for s in specs])

            def attention(self, q, k, v, call):
                B, HG, Q, D = q.shape
                G = HG // k.shape[1]
                kp = call.key_pos.expand(B, k.shape[1], -1)[:, :, None, :]          # [B, Hg, 1, S]
                qp = call.query_pos[:, None, :, None]                               # [B, 1, Q, 1]
                sink = self.sink.to(q.device)[None, :, None, None]
                allowed = (kp >= 0) & (kp <= qp) & ((kp < sink) | (kp == qp))       # [B, Hg, Q, S]
                scores = torch.einsum("bhqd,bhsd->bhqs", q.float(), k.repeat_interleave(G, 1).float()) * call.scale
                weights = scores.masked_fill(~allowed.repeat_interleave(G, 1), float("-inf")).softmax(-1)
                out = torch.einsum("bhqs,bhsd->bhqd", weights.nan_to_num(0.0), v.repeat_interleave(G, 1).float())
                out = out.masked_fill((call.query_pos < 0)[:, None, :, None], 0.0)
                return out.transpose(1, 2).to(q.dtype)
    ''',
    "engine.py": '''
        import torch

        from headwise.engine.step import decode_pages
        from headwise.kinds.call import AttentionCall
        from .attention import SinkOnlyGroup


        class SinkOnlyEngineGroup:
            def __init__(self, layer, heads, specs, weights):
                self.group = SinkOnlyGroup(layer, heads, specs, weights)

            def _call(self, query_pos, key_pos, scale):
                return AttentionCall(module=None, query_pos=query_pos, key_pos=key_pos,
                                     lengths=query_pos.max(-1).values + 1, scale=scale)

            def prefill(self, step, heads, q, k, v):
                k, v, k_pos = step.prefill_keys(heads, k, v)
                call = self._call(step.prefill_pos[None], k_pos, step.scale)
                return self.group.attention(q, k, v, call).transpose(1, 2)

            def decode(self, step, heads, q, k, v):
                keys, values, key_pos, _, _ = decode_pages(step, heads)
                call = self._call(step.decode_pos[:, None], key_pos, step.scale)
                return self.group.attention(q[:, :, None], keys, values, call)[:, 0]
    ''',
}


@pytest.fixture
def sink_only_kind(tmp_path):
    folder = tmp_path / "sink_only"
    folder.mkdir()
    for name, text in FILES.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    headwise.kinds.__path__.append(str(tmp_path))
    try:
        yield registry.get("sink_only")
    finally:
        headwise.kinds.__path__.remove(str(tmp_path))
        registry.unregister_kind("sink_only")
        registry._scanned.discard("headwise.kinds.sink_only")
        for module in [m for m in sys.modules if m.startswith("headwise.kinds.sink_only")]:
            del sys.modules[module]


def plans(model, sink=3):
    """The toy kind on every head, and the built-in window rule that keeps the same tokens."""
    toy = registry.get("sink_only").spec(sink=sink)
    info = ModelInfo.of(model)
    same = Window(sink=sink, alpha=1.0, beta=0.0)
    return (Plan(info, tuple((toy,) * info.num_kv_heads for _ in range(info.num_layers)), {"method": "toy"}),
            Plan(info, tuple((same,) * info.num_kv_heads for _ in range(info.num_layers)), {"method": "window"}))


def test_a_kind_in_a_new_folder_runs_everywhere_with_no_edit_elsewhere(sink_only_kind, llama, tmp_path, capsys):
    from headwise.cli import main

    assert sink_only_kind.runtimes == ("hf", "engine") and sink_only_kind.mark == "O"
    toy, window = plans(llama)
    # plan round-trip
    toy.save(tmp_path / "toy.json")
    loaded = load_plan(tmp_path / "toy.json", llama)
    assert loaded == toy
    # patch_model: the toy kind's own attention equals the built-in window that keeps the same tokens
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, plan in (("toy", loaded), ("window", window)):
        patch_model(llama, plan)
        try:
            with torch.no_grad():
                out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
        finally:
            unpatch_model(llama)
        logits[name] = torch.stack(out.logits)
    torch.testing.assert_close(logits["toy"], logits["window"], atol=1e-5, rtol=1e-5)
    # the engine: its own engine group gives the patched model's greedy tokens, whole and chunked prefill
    for step_tokens in (512, 8):
        assert_engine_equals_patched_hf(llama, loaded, random_prompts((4, 23, 40), seed=3), 6,
                                        max_num_batched_tokens=step_tokens)
    # plan show: its memory row and its heatmap mark
    assert main(["plan", "show", str(tmp_path / "toy.json"), "--lengths", "64,128"]) == 0
    out = capsys.readouterr().out
    assert "sink_only" in out and (tmp_path / "toy.png").exists()
