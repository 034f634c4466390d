"""Scoring of the generation tasks, called by lm-eval through each task YAML's ``process_results``."""

from __future__ import annotations


def contains_all(answers: list[str], generation: str) -> float:
    """Fraction of ``answers`` found in ``generation`` (case-insensitive): RULER's string_match_all.

    For single-answer tasks this is 1.0 when the answer appears in the output and 0.0 otherwise.
    """
    if not answers:
        raise ValueError("a retrieval sample needs at least one answer.")
    text = generation.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: ``doc`` is one JSONL row, ``results`` holds the one generation."""
    return {"contains": contains_all(doc["answers"], results[0])}
