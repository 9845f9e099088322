"""Building loramix's wheel for tests that install it as a user would."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build_wheel(work: Path) -> Path:
    """``pip wheel --no-deps`` from a copy of the source tree (so nothing is written into the checkout); the
    path of the built ``loramix-*.whl`` under ``work/dist``."""
    src = work / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"),
                           str(src)], cwd=work, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = (work / "dist").glob("loramix-*.whl")
    return built
