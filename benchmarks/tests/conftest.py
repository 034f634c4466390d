"""Fixtures of the benchmark tests: a tiny random model with the embedded model's real tokenizer.

transformers is imported inside the helper, not here: a run that collects these tests before
``tests/`` must not import Triton before ``tests/conftest.py`` chooses its interpreter mode.
"""

from __future__ import annotations

import pytest


def tiny_llama_with_real_tokenizer():
    """A 2-layer random Llama (GQA 3) with the embedded model's tokenizer, so the eval generators run."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from headwise.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(config).eval(), tok


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_with_real_tokenizer()
