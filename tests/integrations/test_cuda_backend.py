"""The CUDA backend's wiring, on CPU: vLLM 0.32's Triton backend module imports without a GPU, so
``HeadwiseTritonBackend`` is built, registered and run here on vLLM's real classes.

In a fresh process (vLLM's backend registry is process state): ``register()`` makes
``--attention-backend HEADWISE`` parse and resolve to the subclass; the plan decides the
implementation and the CUDA-graph support; ``HeadwiseTritonImpl.forward`` over a cache in vLLM's
CUDA layout equals the sink-window reference for a layer of the shipped d25 plan (kernels: the CPU
backends ``auto`` picks; the Triton kernels are compared in ``test_paged_flash.py``). A GPU run of
vLLM with this backend has not been made.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import types
import torch
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
from vllm.config.attention import AttentionConfig
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from headwise.integrations.vllm import register
from headwise.integrations.vllm.cpu import HeadwiseCPUBackend
from headwise.integrations.vllm.cuda import (HeadwiseTritonBackend, HeadwiseTritonImpl, HeadwiseTritonMetadata,
                                             HeadwiseTritonMetadataBuilder)
from headwise.integrations.vllm import paged_flash
from headwise.kernels.sink_window import naive
from headwise.kinds.kv_rule import LayerRule
from headwise.models import embedded_model_dir
from headwise.plan import Plan

register()
register()                                          # idempotent: vLLM may load plugins twice in a process
assert AttentionBackendEnum["HEADWISE"].get_class() is HeadwiseTritonBackend
assert issubclass(HeadwiseTritonBackend, TritonAttentionBackend) and HeadwiseTritonBackend.get_name() == "HEADWISE"
assert AttentionConfig(backend="headwise").backend is AttentionBackendEnum["HEADWISE"]   # the CLI flag's parsing
assert AttentionBackendEnum.CPU_ATTN.get_class() is HeadwiseCPUBackend

plan_path = "smollm2-135m-d25"
model_config = ModelConfig(model=str(embedded_model_dir()), dtype="float32")
with_plan = VllmConfig(model_config=model_config, additional_config={"headwise_plan": plan_path})
assert HeadwiseTritonMetadataBuilder.get_cudagraph_support(with_plan, None) is AttentionCGSupport.NEVER
assert HeadwiseTritonMetadataBuilder.get_cudagraph_support(VllmConfig(), None) is AttentionCGSupport.ALWAYS
assert HeadwiseTritonBackend.get_impl_cls() is TritonAttentionImpl                 # no config: inert
with set_current_vllm_config(VllmConfig(model_config=model_config)):
    assert HeadwiseTritonBackend.get_impl_cls() is TritonAttentionImpl             # no plan: inert
with set_current_vllm_config(with_plan):
    assert HeadwiseTritonBackend.get_impl_cls() is HeadwiseTritonImpl
    H, HKV, D, BS = 9, 3, 64, 16
    impl = HeadwiseTritonImpl(H, D, D ** -0.5, HKV, None, None, "auto")

# one step: a 300-token sequence decoding, a fresh 40-token prompt, a 20-token chunk after 70 tokens
torch.manual_seed(0)
seqs = [(299, 1), (0, 40), (70, 20)]
lengths = [c + q for c, q in seqs]
tables = torch.tensor([[7, 3, 12, 28, 9, 15, 1, 14, 2, 11, 5, 16, 18, 19, 20, 21, 22, 23, 24],
                       [4, 6, 8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
                       [10, 13, 17, 25, 26, 27, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]], dtype=torch.int32)
physical = torch.zeros(30, BS, HKV, 2 * D)                # slots before heads, as vLLM's NHD layout; block 0 is vLLM's null block
kv_cache = physical.transpose(1, 2)                        # logical [P, Hkv, bs, 2D]
keys = [torch.randn(n, HKV, D) for n in lengths]
values = [torch.randn(n, HKV, D) for n in lengths]
key_cache, value_cache = paged_flash.split_cache(kv_cache)
for b, n in enumerate(lengths):
    pos = torch.arange(n)
    blocks = tables[b, pos // BS].long()
    key_cache[blocks, pos % BS] = keys[b]
    value_cache[blocks, pos % BS] = values[b]
qsl = torch.tensor([0, 1, 41, 61], dtype=torch.int32)
seq_lens = torch.tensor(lengths, dtype=torch.int32)
query = torch.randn(64, H, D)                              # padded past the 61 real tokens
new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, seqs)] + [torch.zeros(3, HKV, D)])
new_v = torch.cat([v[c:] for v, (c, _) in zip(values, seqs)] + [torch.zeros(3, HKV, D)])
meta = HeadwiseTritonMetadata(num_actual_tokens=61, max_query_len=40, query_start_loc=qsl, max_seq_len=300,
                              seq_lens=seq_lens, block_table=tables, slot_mapping=torch.zeros(64, dtype=torch.long),
                              seq_threshold_3D=0, num_par_softmax_segments=16, softmax_segm_output=torch.empty(0),
                              softmax_segm_max=torch.empty(0), softmax_segm_expsum=torch.empty(0), causal=True)
layer = types.SimpleNamespace(layer_name="model.layers.7.self_attn.attn")
output = torch.full((64, H, D), float("nan"))
impl.forward(layer, query, new_k, new_v, kv_cache, meta, output)
plan = Plan.from_spec(plan_path, model_config.hf_config)
rule = LayerRule.from_heads(plan.layers[7])
assert not rule.all_dense and len(set(rule.span(torch.tensor([300])).tolist()[0])) > 1   # heads of two spans at 300
for b, (c, q) in enumerate(seqs):
    s, e, n = int(qsl[b]), int(qsl[b + 1]), c + q
    used = rule.as_dense() if plan.prefill == "dense" and q > 1 else rule     # prefill tokens of a dense-prefill plan
    ref = naive.sink_window_attention(query[s:e].transpose(0, 1)[None], keys[b].transpose(0, 1)[None],
                                      values[b].transpose(0, 1)[None], torch.arange(c, n)[None],
                                      torch.arange(n)[None, None], used.sink, used.span(torch.tensor([n])), D ** -0.5)
    torch.testing.assert_close(output[s:e], ref[0].transpose(0, 1), atol=2e-5, rtol=1e-4)
assert torch.isnan(output[61:]).all()                      # padding rows untouched
print("ok")
'''


@pytest.mark.vllm                  # vLLM's classes, no vLLM engine: the fast tier's check of the plugin
def test_cuda_backend_registers_and_runs_the_plan_in_vllm_cuda_layout():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-3000:] + result.stderr[-5000:]
