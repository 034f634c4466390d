"""Fixtures of the kinds' tests: a tiny random Llama checkpoint with the embedded model's tokenizer,
for the ``headwise fit <kind>`` commands (they load a model folder)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny random Llama (2 layers, 2 KV heads of 2 query heads, head_dim 8) with the real vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from headwise.models import embedded_model_dir

    tok = AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
