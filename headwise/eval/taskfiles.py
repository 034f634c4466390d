"""The long-context tasks as lm-eval tasks: YAML files plus locally generated JSONL data.

``write_tasks(tokenizer, directory, kinds, lengths, trials)`` writes one task per (kind, length),
named ``headwise_<kind>_<length>`` and tagged ``headwise_long``; load them with
``lm_eval.tasks.TaskManager(include_path=directory)``. Nothing is downloaded: every YAML reads
its own JSONL through ``dataset_path: json``.

Context length means the whole sequence: a generation prompt has ``length - max_gen_toks``
tokens so prompt + answer fit in ``length``; a perplexity document has ``length - 1`` tokens
because lm-eval puts one prefix token in front.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .tasks import generate

TAG = "headwise_long"
SCORING_SHIM = "headwise_scoring"


@dataclass(frozen=True)
class TaskKind:
    """How one generator becomes an lm-eval task."""

    name: str
    max_gen_toks: int | None    # None: a perplexity (loglikelihood_rolling) task


KINDS = {
    "passkey": TaskKind("passkey", 12),
    "niah": TaskKind("niah", 32),        # SmolLM2 answers in up to 22 tokens (measured); 16 cut the number off
    "kv": TaskKind("kv", 48),
    "vt": TaskKind("vt", 40),
    "perplexity": TaskKind("perplexity", None),
}


def task_name(kind: str, length: int) -> str:
    return f"headwise_{kind}_{length}"


def _yaml_head(name: str, data: Path, output_type: str) -> str:
    """The part of a task YAML every headwise task shares: name, tag, local JSONL test split."""
    return f"""task: {name}
tag: {TAG}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
test_split: test
output_type: {output_type}
"""


def _generation_yaml(name: str, data: Path, max_gen_toks: int) -> str:
    return _yaml_head(name, data, "generate_until") + f"""doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answers | join(', ')}}}}"
target_delimiter: ""
generation_kwargs:
  until: []
  max_gen_toks: {max_gen_toks}
  do_sample: false
process_results: !function {SCORING_SHIM}.process_results
metric_list:
  - metric: contains
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _perplexity_yaml(name: str, data: Path) -> str:
    return _yaml_head(name, data, "loglikelihood_rolling") + """doc_to_text: ""
doc_to_target: "{{prompt}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_tasks(tokenizer, directory: str | Path, kinds: list[str], lengths: list[int], trials: int | dict[str, int],
                seed: int = 0) -> list[str]:
    """Generate data and YAML for every (kind, length) into ``directory``; returns the task names.

    ``trials`` is samples per task, or a ``{kind: samples}`` dict.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{SCORING_SHIM}.py").write_text(
        '"""Written by headwise: lets task YAMLs here score with headwise.eval.scoring."""\n'
        "from headwise.eval.scoring import process_results  # noqa: F401\n")
    names = []
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; choose from {sorted(KINDS)}.")
        spec = KINDS[kind]
        n = trials[kind] if isinstance(trials, dict) else trials
        for length in lengths:
            name = task_name(kind, length)
            size = length - 1 if spec.max_gen_toks is None else length - spec.max_gen_toks
            samples = generate(kind, tokenizer, size, n, seed=seed)
            data = directory / f"{name}.jsonl"
            with open(data, "w") as f:
                for sample in samples:
                    f.write(json.dumps({**sample.to_json(), "context_length": length}) + "\n")
            yaml = (_perplexity_yaml(name, data) if spec.max_gen_toks is None
                    else _generation_yaml(name, data, spec.max_gen_toks))
            (directory / f"{name}.yaml").write_text(yaml)
            names.append(name)
    return names
