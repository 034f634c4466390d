"""``benchmarks/decode.py`` with every (row, dtype, checkout) in its own process, then one table.

    python benchmarks/decode_rows.py --out DIR [--settings 4096x4] [--decode-tokens 32]
        [--rows engine-dense,engine-d25,vllm] [--dtypes float32,bfloat16] [--checkout NAME=PATH ...]
        [--model NAME]

Each checkout (default: this one, as ``after``) runs ``PATH/benchmarks/decode.py --rows ROW --dtype D
--json DIR/NAME-ROW-D.json`` with ``PYTHONPATH=PATH``, rows interleaved across checkouts, so a
before/after comparison shares one run. vLLM does not depend on the checkout: it runs once, from the
first. The table gives each row's decode tok/s, its share of the read bandwidth that row's process
measured (weights + KV bytes read per step / step time / bandwidth) and d25 / vLLM in the same dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", default="4096x4")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rows", default="engine-dense,engine-d25,vllm")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkout", action="append", default=None, metavar="NAME=PATH")
    parser.add_argument("--model", default=None, help="model name (headwise model list) or local checkpoint folder, "
                        "passed to every row (default: the embedded SmolLM2)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkouts = [c.split("=", 1) for c in args.checkout] if args.checkout else [["after", str(REPO)]]
    rows, dtypes = args.rows.split(","), args.dtypes.split(",")
    done = []
    for dtype in dtypes:
        for row in rows:
            for i, (name, path) in enumerate(checkouts):
                if row == "vllm" and i > 0:
                    continue
                tag = "vllm" if row == "vllm" else name
                target = out / f"{tag}-{row}-{dtype}.json"
                cmd = [sys.executable, str(Path(path) / "benchmarks" / "decode.py"), "--settings", args.settings,
                       "--decode-tokens", str(args.decode_tokens), "--rows", row, "--dtype", dtype,
                       "--threads", str(args.threads), "--json", str(target)]
                if args.model:
                    cmd += ["--model", args.model]
                print(f"== {tag} {row} {dtype}: {' '.join(cmd[1:])}", flush=True)
                subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=path), check=False)
                if target.is_file():
                    done.append((tag, row, dtype, json.loads(target.read_text())))
    print(table(done))


def table(done: list[tuple[str, str, str, dict]]) -> str:
    """One markdown line per (checkout, row, dtype, setting) of the rows' JSON; ``/ vLLM`` in the same dtype
    and setting."""
    out = ["| checkout | row | dtype | setting | prefill s | decode tok/s | ms/step | MB read/step | GB/s read | "
           "read bandwidth GB/s | % of bandwidth | / vLLM same dtype |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    vllm = {(dtype, x["setting"]): x["decode_tok_s"] for tag, row, dtype, r in done if row == "vllm"
            for x in r["rows"] if x.get("decode_tok_s")}
    for tag, row, dtype, r in done:
        for x in r["rows"]:
            if x.get("error"):
                out.append(f"| {tag} | {row} | {dtype} | {x['setting']} | {x['error']} ||||||||")
                continue
            bw = r["machine"]["read_gbps"]
            ref = vllm.get((dtype, x["setting"]))
            ratio = f"{x['decode_tok_s'] / ref:.2f}x" if ref else "-"
            out.append(f"| {tag} | {row} | {dtype} | {x['setting']} | {x['prefill_s']:.1f} | {x['decode_tok_s']:.1f} | "
                       f"{1e3 * x['step_s']:.1f} | {x['bytes_per_step'] / 1e6:.0f} | {x['achieved_gbps']:.1f} | "
                       f"{bw:.1f} | {100 * x['achieved_gbps'] / bw:.0f}% | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
