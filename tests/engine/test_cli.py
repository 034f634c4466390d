"""``headwise generate`` on the embedded model."""

from __future__ import annotations

import json

import pytest

from headwise.cli import main


@pytest.mark.real_model                      # the CLI loads the embedded model itself
def test_generate_cli_writes_jsonl(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "The capital of France is"}) + "\n" +
                       json.dumps({"prompt_token_ids": []}) + "\nWrite one word:\n")
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--plan", "uniform:0.25", "--prompt-file", str(prompts), "--max-tokens", "6",
               "--kv-cache-memory", "256MiB", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 1                                                   # one request failed, the others ran
    assert [r["error"] is None for r in records] == [True, False, True]
    assert "prompt is empty" in records[1]["error"]
    assert all(len(r["token_ids"]) >= 1 for r in (records[0], records[2]))
    assert "tok/s" in capsys.readouterr().err
