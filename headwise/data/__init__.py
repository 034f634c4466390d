"""Text the package builds prompts from, in one place for calibration, fitting, eval and benchmarks.

- ``prose``: the prose corpus (CPython's ``pydoc_data.topics``): its text, its description for
  plans and caches, its tokens, slices of it by token count and a token stream for benchmark
  prompts. Every reader of the corpus goes through it (benchmarks too: ``token_stream``).
- ``calibration``: calibrator samples (prose, a question about it, the model's own answer).
- ``recall``: gate-training samples (facts in standard-library docstrings, all asked back).
"""
