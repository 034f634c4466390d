"""``python -m headwise.eval ...``: lm-eval's own CLI with the ``headwise`` model registered.

lm-eval's CLI cannot discover third-party models, so this imports the registration first, e.g.::

    headwise eval --write-tasks /tmp/hw_tasks --lengths 4096 --trials 5
    python -m headwise.eval run --model headwise --model_args plan=uniform:0.25 \\
        --include_path /tmp/hw_tasks --tasks headwise_long --batch_size 1 --device cpu
"""

from .runner import offline

offline()

from lm_eval.__main__ import cli_evaluate  # noqa: E402

from . import lm  # noqa: E402,F401  (registers the "headwise" lm-eval model)

if __name__ == "__main__":
    cli_evaluate()
