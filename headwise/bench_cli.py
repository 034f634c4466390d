"""``headwise bench decode``: the decode benchmark of ``headwise/bench/decode.py`` (also
``scripts/bench_decode.py``)."""

from __future__ import annotations


def register(subparsers) -> None:
    from .bench.decode import add_arguments

    p = subparsers.add_parser("bench", help="benchmarks")
    sub = p.add_subparsers(dest="bench_command", required=True)
    decode = sub.add_parser("decode", help="decode tok/s, KV held and bandwidth fraction: HF, vLLM, engine")
    add_arguments(decode)
    decode.set_defaults(func=_decode)


def _decode(args) -> int:
    from .bench.decode import run

    return run(args)
