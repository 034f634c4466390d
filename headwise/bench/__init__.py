"""Benchmarks shipped with headwise (``headwise bench ...``; thin scripts in ``scripts/`` call them)."""
