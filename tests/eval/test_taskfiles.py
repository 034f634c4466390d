"""lm-eval tasks written locally load offline through TaskManager and score with our metric."""

from __future__ import annotations

import json

from headwise.eval.scoring import contains_all, process_results
from headwise.eval.taskfiles import TAG, write_tasks


def test_written_tasks_load_in_lm_eval(tokenizer, tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    names = write_tasks(tokenizer, tmp_path, ["passkey", "perplexity"], [600], 2, seed=0)
    assert names == ["headwise_passkey_600", "headwise_perplexity_600"]
    manager = TaskManager(include_path=str(tmp_path))
    assert set(names) <= set(manager.all_tasks) and TAG in manager.all_tasks
    tasks = get_task_dict(names, manager)
    passkey, ppl = tasks["headwise_passkey_600"], tasks["headwise_perplexity_600"]
    rows = [json.loads(line) for line in open(tmp_path / "headwise_passkey_600.jsonl")]
    docs = list(passkey.test_docs())
    assert [passkey.doc_to_text(d) for d in docs] == [r["prompt"] for r in rows]
    assert passkey.config.generation_kwargs["max_gen_toks"] == 12
    assert all(r["num_tokens"] + 12 <= 600 for r in rows)
    assert ppl.OUTPUT_TYPE == "loglikelihood_rolling"
    assert [ppl.doc_to_target(d) for d in ppl.test_docs()][0].startswith(rows[0]["prompt"][:0])
    assert passkey.process_results(docs[0], [f"The pass key is {rows[0]['answers'][0]}."]) == {"contains": 1.0}


def test_contains_all_scoring():
    assert contains_all(["ABCDE", "FGHIJ"], "abcde and nothing else") == 0.5
    assert process_results({"answers": ["42"]}, ["It is 42."]) == {"contains": 1.0}
    assert process_results({"answers": ["42"]}, ["It is 41."]) == {"contains": 0.0}
