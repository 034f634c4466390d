"""Research probes and negative results, outside the package: ``python scripts/<name>.py ...``.

``softplus_extrapolation.py`` (length extrapolation of re-weighted heads; no softplus plan ships) and
``probe_moh.py`` (the measurements behind the ``moh`` router and budget). A package only so that
``scripts/tests`` can import them; benchmarks live in ``benchmarks/``.
"""
