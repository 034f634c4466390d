"""Fixtures for the eval tests: the embedded model's tokenizer (fast, no weights)."""

from __future__ import annotations

import pytest

# HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: set for every test by tests/conftest.py.


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from headwise.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir(), local_files_only=True)
