"""headwise's benchmarks: not part of the installed package.

Run from a checkout as ``python benchmarks/<name>.py ...`` (each script puts the checkout first on
``sys.path``, so it measures this checkout's ``headwise``); timings under
``flock /tmp/headwise-heavy.lock``. Shared helpers live in ``benchmarks/common.py``; dated results,
each with its command, commit and machine, in ``benchmarks/results/``.
"""
