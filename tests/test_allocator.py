"""allocator.tune_malloc: applied once per process, switched off by LORAMIX_TUNE_MALLOC=0."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHECK = "from loramix.allocator import tune_malloc, malloc_tuned; print(tune_malloc(), tune_malloc(), malloc_tuned())"


def _run(env_value: str | None) -> str:
    import os

    env = dict(os.environ)
    env.pop("LORAMIX_TUNE_MALLOC", None)
    if env_value is not None:
        env["LORAMIX_TUNE_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tunes_glibc_once_and_reports_it() -> None:
    assert _run(None).split() == ["True", "True", "True"]


def test_environment_switch_leaves_malloc_alone() -> None:
    assert _run("0").split() == ["False", "False", "False"]


def test_injecting_leaves_the_callers_allocator_alone() -> None:
    code = (
        "import sys; sys.path.insert(0, 'tests'); from helpers.tiny_models import tiny_model; "
        "from loramix import MixLoraConfig, inject; from loramix.allocator import malloc_tuned; "
        "print(malloc_tuned()); inject(tiny_model('llama'), MixLoraConfig(num_experts=2, r=2)); print(malloc_tuned())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]  # only the CLI and the bench, which own their process, tune it
