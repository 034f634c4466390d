"""Compare plans on the long-context tasks through lm-eval, and write the report."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

logger = logging.getLogger("headwise")


def offline() -> None:
    """No hub access for anything lm-eval or datasets would otherwise try to fetch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def plan_label(spec: str) -> str:
    """Short display name of a plan spec: ``dense``, ``uniform 25%``, or a plan file's stem."""
    if spec == "dense":
        return "dense"
    if spec.startswith("uniform:"):
        return f"uniform {100 * float(spec.split(':')[1]):g}%"
    return Path(spec).stem


def slug(text: str) -> str:
    """``text`` with only letters, digits, dots and dashes: safe in file and folder names."""
    return re.sub(r"[^A-Za-z0-9.-]+", "", text)


def run_name(model_name: str, plans: dict[str, str], kinds: list[str], lengths: list[int],
             trials: dict[str, int], seed: int) -> str:
    """Directory name that states the run's configuration."""
    counts = sorted(set(trials.values()))
    return "_".join([
        "eval", slug(model_name), "+".join(slug(p) for p in plans),
        "-".join(f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths),
        "+".join(kinds), "trials" + "-".join(map(str, counts)), f"seed{seed}"])


def write_answers(path: Path, samples: dict[str, list[dict]]) -> None:
    """One JSON line per generation sample: task, depth, expected answers, the model's answer, score."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for task, rows in samples.items():
            for row in rows:
                doc = row["doc"]
                if not doc.get("answers"):
                    continue
                f.write(json.dumps({"task": task, "depth": doc.get("depth"), "num_tokens": doc.get("num_tokens"),
                                    "answers": doc["answers"], "response": row["filtered_resps"][0],
                                    "contains": row.get("contains")}) + "\n")


def compare_plans(plans: dict[str, str], kinds: list[str], lengths: list[int], trials: dict[str, int],
                  out_root: str | Path, pretrained: str | None = None, batch_size: int = 1, seed: int = 0,
                  kernels: str = "auto") -> tuple[Path, str]:
    """Evaluate every plan (``label -> spec``) on every task kind at every length with lm-eval.

    Writes tasks (YAML + JSONL) and the report into ``out_root/<run name>/``. Returns
    ``(output directory, markdown table)``.
    """
    offline()
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from ..models import load_model
    from ..patches import unpatch_model
    from ..plan import ModelInfo
    from .lm import HeadwiseLM
    from .report import write_report
    from .taskfiles import write_tasks

    model, tokenizer = load_model(pretrained)
    name = ModelInfo.of(model).name
    out = Path(out_root) / run_name(name, plans, kinds, lengths, trials, seed)
    task_dir = out / "tasks"
    t0 = time.perf_counter()
    names = write_tasks(tokenizer, task_dir, kinds, lengths, trials, seed=seed)
    logger.info("headwise eval: wrote %d tasks to %s in %.1f s", len(names), task_dir, time.perf_counter() - t0)
    manager = TaskManager(include_path=str(task_dir))
    config = {"model": name, "pretrained": pretrained or "default", "plans": plans, "tasks": kinds,
              "lengths": lengths, "trials": trials, "seed": seed, "batch_size": batch_size, "kernels": kernels,
              "threads": torch.get_num_threads(), "task_dir": str(task_dir)}
    results, seconds = {}, {}
    for label, spec in plans.items():
        print(f"== {label} ({spec})", flush=True)
        lm = HeadwiseLM(pretrained=model, tokenizer=tokenizer, plan=spec, kernels=kernels, batch_size=batch_size)
        t0 = time.perf_counter()
        try:
            out_eval = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, log_samples=True,
                                               random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
        finally:
            unpatch_model(model)
        seconds[label] = time.perf_counter() - t0
        results[label] = out_eval["results"]
        write_answers(out / f"answers_{slug(label)}.jsonl", out_eval["samples"])
    table = write_report(out, config, results, seconds)
    return out, table
