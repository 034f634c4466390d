"""``python -m headwise.eval``: lm-eval's own CLI with the ``headwise`` model registered."""

from __future__ import annotations

import importlib


def test_module_is_lm_evals_cli_with_the_headwise_model():
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.registry import get_model

    main = importlib.import_module("headwise.eval.__main__")       # importing runs no CLI (no __main__ name)
    from headwise.eval.lm import HeadwiseLM

    assert main.cli_evaluate is cli_evaluate
    assert get_model("headwise") is HeadwiseLM
