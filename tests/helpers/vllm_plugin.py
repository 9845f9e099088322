"""Running vLLM with loramix's plugin from a checkout, without installing loramix into vLLM's virtualenv.

vLLM finds general plugins through the ``vllm.general_plugins`` entry point. :func:`plugin_env` writes a
minimal dist-info declaring loramix's entry point into a temporary directory and returns an environment whose
PYTHONPATH holds that directory and this checkout's ``src/``: every vLLM process (engine, workers) then loads
the plugin exactly as it would from an installed ``loramix``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
SCRIPT = Path(__file__).resolve().parents[1] / "vllm_mixlora.py"


def plugin_env(tmp: Path, with_plugin: bool = True, site: Path | None = None) -> dict[str, str]:
    """``site``: a directory that holds an installed loramix (``pip install --target``), used instead of the
    checkout's ``src/`` and the written dist-info."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
        return env
    paths = [str(SRC)]
    if with_plugin:
        dist = tmp / "site" / "loramix_checkout_plugin-0.0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loramix-checkout-plugin\nVersion: 0.0\n")
        (dist / "entry_points.txt").write_text("[vllm.general_plugins]\nloramix = loramix.vllm_plugin:register\n")
        paths.insert(0, str(tmp / "site"))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_vllm(python: Path, jobs: list[dict], tmp: Path, with_plugin: bool = True,
             timeout: float = 1800, site: Path | None = None) -> tuple[list | None, subprocess.CompletedProcess]:
    """Run ``tests/vllm_mixlora.py`` on ``jobs``; (its results or None, the finished process)."""
    job_file = tmp / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    run = subprocess.run([str(python), str(SCRIPT), str(job_file)], capture_output=True, text=True,
                         env=plugin_env(tmp, with_plugin, site), timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("VLLM_RESULT ")]
    return (json.loads(lines[-1].removeprefix("VLLM_RESULT ")) if lines else None), run
