"""Every `loramix ...` command shown in the README and in docs/ (guides and reports) parses against the command
line, and runs.

Parsing: its command exists, each flag it gives exists and takes the value written, and no required flag is
missing.

Running (`test_documented_command_runs`): each command, as read from the page, runs through the command
line's own entry (`loramix.cli.main`, in-process) in a temporary working directory holding what the page
assumes is there: a copy of `configs/`, the reader's own files the page names (`data.jsonl`, `sst2.jsonl`,
`tickets_jan.jsonl`, `my_continual.yaml`, ...; `helpers/doc_data.py` writes small ones in the real formats),
`LORAMIX_DATA_DIR` pointing at small stand-ins of the public data sets in their real formats, and the
adapters or libraries produced by the page's earlier commands (a test runs those first, in page order, in
the same directory). What the test changes about a command, and why:

* size flags (`helpers.doc_commands.SIZES`): 2 optimiser steps, a few rows, items and tokens, short
  sequences, replacing the page's value or added where the page gives none, so that each run takes seconds;
* `--model <tiny local model>` for the commands that load a base model (`TAKES_MODEL`), in place of the
  packaged SmolLM2-135M-Instruct, of a hub id (`meta-llama/Llama-3.2-1B`, which needs the internet) or of
  a `<placeholder>`; the slow suite runs the main job (`scripts/quickstart.sh`) with the real default model;
* shell variables are given the values the page gives them (`$LORAMIX_DATA_DIR`, `$DATA`: the data stand-ins);
  absolute paths under `/tmp/` are moved into the working directory;
* `skills serve` gets a free port and, as `--upstream`, a stand-in OpenAI-compatible server (vLLM is not
  installed here); `chat` reads two messages and `/exit` from its standard input.

The experiment reports (docs/reports/) run in the slow suite with the same tiny settings, each after the
report's earlier commands. No flag the page shows is dropped. The page's `...` (more flags of the reader's
own) is left out, except for `accelerate launch ... train ...`, which gets the tiny model, data and output
directory. Commands that cannot run here are skipped with the reason. Each run must exit 0 and write or
print what the command promises (`check_result`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers.doc_commands import (
    PAGES,
    PLACEHOLDER,
    ROOT,
    DocCommand,
    Result,
    code_blocks,
    code_lines,
    doc_commands,
    expand,
    flag_value,
    page_commands,
    page_variables,
    run_cli,
    set_flag,
    sized,
)
from loramix.cli import build_parser, command_table

COMMANDS = page_commands()


def test_the_pages_show_commands():
    """The extraction finds the commands (a change of page layout would otherwise silently test nothing), those
    behind an environment assignment or a launcher included, and not program output that names one."""
    names = {c.name for c in COMMANDS}
    assert {"train", "generate", "chat", "eval", "compare", "bench", "export", "continual", "skills add",
            "skills route", "skills generate", "skills list", "skills export", "skills serve"} <= names
    pages = {c.page for c in COMMANDS}
    assert {"README.md", "docs/training.md", "docs/results.md", "docs/reports/continual.md"} <= pages
    assert not [c for c in COMMANDS if c.page == "docs/quickstart.md"]  # its `loramix generate` is output
    launched = {c.launcher.split()[0] for c in COMMANDS if c.launcher}
    assert launched == {"srun", "accelerate"}
    text = "```\nLORAMIX_DATA_DIR=/d OMP_NUM_THREADS=1 loramix eval --tasks \"[boolq]\"   # note\n" \
           "Adapter: runs/a (loramix generate --adapter runs/a)\n```\n"
    (only,) = doc_commands(text)
    assert only.argv == ["eval", "--tasks", "[boolq]"] and only.env == {"LORAMIX_DATA_DIR": "/d",
                                                                       "OMP_NUM_THREADS": "1"}


# --- parsing --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parser():
    return build_parser()


def with_numbers_for_variables(argv: list[str]) -> list[str]:
    """A shell variable or placeholder given to a number or list flag (`--max-steps $N`) as a number or a
    one-item list: the page shows a value there, the test cannot know which. A variable standing where a flag
    would be (`... $START`, flags chosen by the script) is left out."""
    table = command_table()
    entry = table.get(argv[0], {})
    if "commands" in entry and len(argv) > 1:
        entry = entry["commands"].get(argv[1], {})
    kinds = {"--" + f["name"].replace("_", "-"): f["type"] for f in entry.get("flags", [])}
    takes_positional = any(f["positional"] for f in entry.get("flags", []))
    out = list(argv[:1])
    for i in range(1, len(argv)):
        word, before = argv[i], argv[i - 1]
        variable = "$" in word or word == PLACEHOLDER
        kind = kinds.get(before, "").split(" |")[0]
        if variable and kind in ("int", "float"):
            word = "1"
        elif variable and kind.startswith("list"):
            word = "[x]"
        elif variable and word.startswith("$") and not takes_positional and not (kind and kind != "bool"):
            continue
        out.append(word)
    return out


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_parses(parser, cmd, capsys):
    argv = with_numbers_for_variables([a for a in cmd.argv if a != "--help"])
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{cmd.id}\n{capsys.readouterr().err.strip()} (exit {e.code})")


# --- running: how each command runs -----------------------------------------------------------------------------
@dataclass
class Plan:
    """How the test runs the documented command whose line contains ``match`` on ``page``. A command with no
    plan runs in the default suite, after the page's earlier commands, in the page's working directory."""

    page: str
    match: str
    suite: str = "default"
    """default, slow or skip"""
    reason: str = ""
    """Why a command is slow or skipped."""
    needs: tuple[str, ...] = ()
    """Slow commands: the earlier commands of the page (by ``match``) whose files this one reads."""
    fresh: bool = False
    """Its own working directory (it writes where an earlier command of the page wrote, which the command line
    refuses without --overwrite, as it should)."""
    real_model: bool = False
    """The packaged SmolLM2-135M-Instruct rather than the tiny model."""
    runner: str = ""
    """A function of this module that runs it instead of a plain in-process call (a launcher, a server, a
    script)."""


COMPILE = "it compiles with torch.compile (inductor), which is slow on a CPU"
PLANS = [
    Plan("README.md", "--precision bf16 --compile", "slow", COMPILE, fresh=True),
    Plan("README.md", "loramix chat --adapter runs/counsel_chat/adapter --merge --compile-decode", "slow", COMPILE,
         needs=("loramix train --config configs/counsel_chat.yaml --output-dir runs/counsel_chat",)),
    Plan("README.md", "compare --config configs/commonsense_compare.yaml", fresh=True),
    Plan("README.md", "loramix bench --json-path bench.json", "slow", COMPILE + " (bench compiles the decoding)"),
    Plan("README.md", "accelerate launch", "slow", "two training processes", runner="run_accelerate"),
    Plan("docs/benchmarks.md", "loramix bench --steps 10", "slow", COMPILE + " (bench compiles the decoding)"),
    Plan("docs/deploy.md", "loramix skills serve", "slow", "a server started as its own process",
         needs=("loramix skills export",), runner="run_skills_serve"),
    Plan("docs/continual.md", "code_alpaca_2k.json,mbpp.jsonl", "slow",
         "pass@1 runs each generated completion in its own python process"),
    Plan("docs/evaluation.md", "[arc_easy, hellaswag]", "skip",
         "lm-eval's arc_easy and hellaswag download their data from the Hugging Face hub; there is no network here"),
    Plan("docs/evaluation.md", "--tasks \"[boolq]\" --harness-tasks \"[boolq]\"", "skip",
         "lm-eval's boolq downloads super_glue from the Hugging Face hub; there is no network here (loramix's "
         "own boolq runs in README.md's eval)"),
    Plan("docs/training.md", "srun loramix train", runner="run_slurm_script"),
    Plan("docs/reports/skills.md", "loramix skills add $1", "slow", "an experiment report's run, with tiny settings",
         needs=("*",), runner="run_report_skill_add"),
]


def plan_for(cmd: DocCommand) -> Plan:
    found = [p for p in PLANS if p.page == cmd.page and p.match in cmd.line]
    assert len(found) <= 1, f"{cmd.id}: several plans match: {found}"
    if found:
        return found[0]
    if cmd.page.startswith("docs/reports/"):
        return Plan(cmd.page, "", "slow", "an experiment report's run, with tiny settings", needs=("*",))
    return Plan(cmd.page, "")


def test_every_plan_names_one_documented_command():
    """A plan whose command left its page (or now matches several) fails here, naming it."""
    for plan in PLANS:
        matches = [c for c in COMMANDS if c.page == plan.page and plan.match in c.line]
        assert len(matches) == 1, f"{plan.page}: {plan.match!r} matches {len(matches)} commands"


# --- the working directory a page assumes ------------------------------------------------------------------------
@dataclass
class Workspace:
    """A working directory for one page's commands, with what the page assumes is there."""

    page: str
    path: Path
    model: str | None
    data_dir: Path
    variables: dict[str, str]
    arrays: dict[str, list[str]] = field(default_factory=dict)
    results: dict[int, Result] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"LORAMIX_DATA_DIR": str(self.data_dir), "OMP_NUM_THREADS": "1"}


def tiny_model_dir(root: Path) -> str:
    from helpers.tiny_lm import save_tiny_lm

    return save_tiny_lm(root, max_position_embeddings=512)


def tiny_adapter(model_dir: str | None, directory: Path) -> None:
    """A MixLoRA adapter (4 experts, non-zero weights) on the model, as a training run's `adapter/` holds it."""
    from helpers.tiny_models import perturb_adapters
    from loramix import MixLoraConfig, inject, save_adapter
    from loramix.models import load_base_model

    base, _ = load_base_model(model_dir, device="cpu")
    model = inject(base, MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4))
    perturb_adapters(model)
    save_adapter(model, directory)


def local_harness_task(work: Path) -> None:
    """`my_tasks/my_task.yaml`: an lm-eval multiple-choice task over a local JSONL file, as evaluation.md's
    "your own YAMLs" means."""
    tasks = work / "my_tasks"
    tasks.mkdir()
    rows = [{"context": f"Question: is {w} a colour?\nAnswer:", "choices": ["yes", "no"], "gold": int(w == "cat")}
            for w in ("red", "cat", "blue", "green")]
    (tasks / "my_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "my_task.yaml").write_text(f"""task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'my_task.jsonl'}
  cache_dir: {work / '.hf_cache'}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def skill_library(ws: Workspace, library: str) -> None:
    """A skill library of two plain-LoRA skills (sentiment, summary) made with `loramix skills add`."""
    for name, data in (("sentiment", "sst2.jsonl"), ("summary", "dialogsum.jsonl")):
        argv = sized(["skills", "add", name, "--library-dir", library, "--data", data, "--adapter", "lora"],
                     "skills add", ws.model)
        result = run_cli(argv, ws.path, ws.env)
        assert result.rc == 0, result.describe()


def python_output(code: str) -> str:
    """What ``python -c code`` prints (run in-process, from the repository root's imports)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<page>", "exec"), {"__name__": "__main__"})
    return out.getvalue()


def page_arrays(text: str) -> dict[str, list[str]]:
    """The bash arrays a page fills from a program's NUL-separated output
    (`mapfile -d '' -t P < <(python -c "...")`), computed as the page computes them."""
    found = {}
    for name, code in re.findall(r"mapfile -d '' -t (\w+) < <\(python -c \"(.*?)\"\)", text, flags=re.S):
        found[name] = python_output(code).split("\0")
    return found


def prepare(ws: Workspace) -> None:
    """What ``ws.page`` assumes besides the common files (see the module docstring)."""
    w = ws.path
    if ws.page in ("README.md", "docs/evaluation.md"):
        tiny_adapter(ws.model, w / "runs" / "x" / "adapter")
    if ws.page == "docs/evaluation.md":
        local_harness_task(w)
    if ws.page == "docs/continual.md":
        (w / "my_continual.yaml").write_text(
            "tasks: tickets_jan.jsonl,tickets_feb.jsonl\nlearning_rate: 2.0e-3\noutput_dir: runs/my_continual\n")
    if ws.page == "docs/reports/skills.md":
        from bench.skills_demo.demo import prepare as prepare_skills_data

        prepare_skills_data(w / ws.variables["D"], ws.data_dir)  # the report's `demo prepare $D`
        ws.arrays.update(page_arrays((ROOT / ws.page).read_text()))
    if ws.page == "docs/deploy.md":
        tiny_adapter(ws.model, w / "runs" / "quickstart" / "adapter")
        tiny_adapter(ws.model, w / "runs" / "llama" / "adapter")
        tiny_adapter(ws.model, w / "tmp" / "export_quick" / "adapter")
        skill_library(ws, "runs/skills_demo/lib")


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """Working directories by (page, model, fresh command): made once, shared by the page's commands."""
    from helpers.doc_data import write_data_dir, write_user_files

    made: dict[tuple, Workspace] = {}
    shared = tmp_path_factory.mktemp("docs_shared")
    data_dir = write_data_dir(shared / "data")
    tiny = tiny_model_dir(shared / "tiny-model")

    def get(page: str, real_model: bool, key: Any = None) -> Workspace:
        if (page, real_model, key) not in made:
            path = tmp_path_factory.mktemp("docs_" + re.sub(r"\W", "_", page))
            shutil.copytree(ROOT / "configs", path / "configs")
            write_user_files(path)
            variables = {**page_variables((ROOT / page).read_text()), "LORAMIX_DATA_DIR": str(data_dir),
                         "DATA": str(data_dir)}
            ws = Workspace(page, path, None if real_model else tiny, data_dir, variables)
            prepare(ws)
            made[(page, real_model, key)] = ws
        return made[(page, real_model, key)]

    return get


# --- running one command ------------------------------------------------------------------------------------------
def command_argv(cmd: DocCommand, ws: Workspace) -> tuple[list[str], dict[str, str]]:
    """The argument list the test runs for ``cmd`` in ``ws`` and the environment it sets (see the module
    docstring)."""
    env = dict(ws.env)
    for name, value in cmd.env.items():
        env[name] = str(ws.data_dir) if name == "LORAMIX_DATA_DIR" else value
    argv = [str(ws.path / a.removeprefix("/")) if a.startswith("/tmp/") else a for a in cmd.argv]
    argv = expand(argv, {**ws.variables, **env}, ws.arrays)
    return sized(argv, cmd.name, ws.model), env


def yaml_option(argv: list[str], key: str, cwd: Path) -> Any:
    config = flag_value(argv, "--config")
    if config:
        return (yaml.safe_load((cwd / config).read_text()) or {}).get(key)
    return None


def check_result(cmd: DocCommand, result: Result, cwd: Path) -> None:
    """The run exited 0 and wrote or printed what the command promises."""
    assert result.rc == 0, f"{cmd.id} failed\n{result.describe()}"
    argv = result.argv
    out_dir = flag_value(argv, "--output-dir") or yaml_option(argv, "output_dir", cwd)
    name = cmd.name
    if name == "train":
        run = cwd / (out_dir or "runs/loramix")
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == int(flag_value(argv, "--max-steps")), summary
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
    elif name == "generate":
        assert result.out.strip(), result.describe()
    elif name == "chat":  # a prompt for each line read (two messages and /exit), a reply after each message
        turns = result.out.split(">>> ")
        assert len(turns) == 4 and all(t.strip() for t in turns[1:3]), result.describe()
    elif name == "eval":
        for task in yaml.safe_load(flag_value(argv, "--tasks") or "[]") or []:
            assert f"| {task} |" in result.out, result.describe()
        for task in yaml.safe_load(flag_value(argv, "--harness-tasks") or "[]") or []:
            assert task in result.out, result.describe()
    elif name == "compare":
        report = json.loads((cwd / (out_dir or "runs/compare") / "compare.json").read_text())
        assert report["max_steps"] == int(flag_value(argv, "--max-steps"))
    elif name == "bench":
        assert "PEFT" in result.out or "lora" in result.out.lower(), result.describe()
        if flag_value(argv, "--json-path"):
            assert json.loads((cwd / flag_value(argv, "--json-path")).read_text())["variants"]
    elif name == "export":
        assert (cwd / out_dir / "config.json").is_file(), result.describe()
    elif name == "continual":
        summary = json.loads((cwd / (out_dir or "runs/continual") / "summary.json").read_text())
        given = (flag_value(argv, "--tasks") or yaml_option(argv, "tasks", cwd)).split(",")
        assert len(summary["tasks"]) == len(given) if len(given) > 1 else len(summary["tasks"]) >= 2, summary
    elif name == "skills add":
        manifest = json.loads((cwd / flag_value(argv, "--library-dir") / "manifest.json").read_text())
        assert argv[2] in json.dumps(manifest["skills"]), manifest["skills"]
    elif name in ("skills route", "skills generate", "skills list"):
        printed = json.loads(result.out)
        rows = printed.get("routes") or printed.get("results") or printed.get("skills")
        assert rows, printed
        if name == "skills list" and "--verify" in argv:
            assert printed["ok"] is True, printed
    elif name == "skills export":
        assert (cwd / out_dir / "loramix_skills_export.json").is_file()


def run_in(ws: Workspace, index: int, cmd: DocCommand, stdin: str | None = None) -> Result:
    argv, env = command_argv(cmd, ws)
    if cmd.name == "chat" and stdin is None:
        stdin = "I can't sleep before exams.\nAnd on the day itself?\n/exit\n"
    result = run_cli(argv, ws.path, env, stdin=stdin)
    ws.results[index] = result
    return result


def page_order(cmd: DocCommand) -> list[tuple[int, DocCommand]]:
    return [(i, c) for i, c in enumerate(COMMANDS) if c.page == cmd.page]


def run_earlier(ws: Workspace, cmd: DocCommand, plan: Plan) -> None:
    """The page's earlier commands this one may read from: for a default command every earlier default
    command of the page; for a slow one those in ``plan.needs`` (``"*"``: every earlier one that runs)."""
    for i, earlier in page_order(cmd):
        if earlier is cmd:
            return
        earlier_plan = plan_for(earlier)
        if plan.needs == ("*",):
            wanted = earlier_plan.suite != "skip"
        elif plan.suite == "slow" or plan.fresh:
            wanted = any(n in earlier.line for n in plan.needs)
        else:
            wanted = earlier_plan.suite == "default" and not earlier_plan.fresh and not earlier_plan.runner
        if wanted and i not in ws.results:
            run_command(ws, i, earlier, earlier_plan)


def run_command(ws: Workspace, index: int, cmd: DocCommand, plan: Plan) -> None:
    """Run ``cmd`` in ``ws`` (by its plan's runner, or in-process) and check what it did."""
    if plan.runner:
        globals()[plan.runner](cmd, ws)
        ws.results[index] = Result(cmd.argv, 0, "", "")
        return
    result = run_in(ws, index, cmd)
    check_result(cmd, result, ws.path)


def _params():
    params = []
    for cmd in COMMANDS:
        plan = plan_for(cmd)
        marks = {"slow": [pytest.mark.slow], "skip": [pytest.mark.skip(reason=plan.reason)]}.get(plan.suite, [])
        params.append(pytest.param(cmd, plan, marks=marks, id=cmd.id))
    return params


def test_page_variables_and_arrays():
    """The report's shell variables and its array of example requests, as bash would set them."""
    text = (ROOT / "docs/reports/skills.md").read_text()
    assert page_variables(text)["L"] == "runs/skills18/lib2"
    prompts = page_arrays(text)["P"]
    assert len(prompts) == 4 and all(p.strip() for p in prompts)
    assert expand(["$D/$1_train.jsonl", "${P[@]}"], {"D": "d", "1": "boolq"}, {"P": ["a", "b"]}) == [
        "d/boolq_train.jsonl", "a", "b"]


@pytest.mark.parametrize("cmd,plan", _params())
def test_documented_command_runs(cmd, plan, workspaces):
    index = COMMANDS.index(cmd)
    ws = workspaces(cmd.page, plan.real_model, index if plan.fresh else None)
    run_earlier(ws, cmd, plan)
    if index in ws.results and not plan.runner:
        check_result(cmd, ws.results[index], ws.path)
    else:
        run_command(ws, index, cmd, plan)


# --- commands that need more than an in-process call -------------------------------------------------------------
def record_script(script: str | Path, ws: Workspace, env: dict[str, str], shims: dict[str, str] | None = None
                  ) -> list[tuple[Path, list[str]]]:
    """Run a page's shell script with bash, a `loramix` on PATH that only records its working directory and
    arguments (bash does the script's own work: variables, conditions, arrays), and ``shims`` (name -> bash
    body) for the other programs it calls; returns what `loramix` was called with, in order."""
    bin_dir, record = ws.path / ".shims", ws.path / ".recorded"
    bin_dir.mkdir(exist_ok=True)
    shutil.rmtree(record, ignore_errors=True)
    record.mkdir()
    programs = {"loramix": 'n=$(ls "$LORAMIX_RECORD" | wc -l)\n{ printf "%s\\0" "$PWD" "$@"; } > '
                           '"$LORAMIX_RECORD/$(printf %04d "$n")"\n', **(shims or {})}
    for name, body in programs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    script_file = script if isinstance(script, Path) else ws.path / ".script.sh"
    if not isinstance(script, Path):
        script_file.write_text(script)
    proc = subprocess.run(["bash", str(script_file)], cwd=ws.path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env, "LORAMIX_RECORD": str(record),
                               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = []
    for f in sorted(record.iterdir()):
        cwd, *argv = f.read_bytes().decode().split("\0")[:-1]
        calls.append((Path(cwd), argv))
    return calls


def run_slurm_script(cmd: DocCommand, ws: Workspace) -> None:
    """training.md's SLURM script, run twice as SLURM would on a requeue: the first run starts the training
    (`--overwrite`), the second finds its checkpoint and continues it (`--resume true`). `srun` runs its
    command and `scontrol` is not called (each run exits 0)."""
    (script,) = [b for b in code_blocks((ROOT / cmd.page).read_text()) if "srun loramix" in b]
    shims = {"srun": 'exec "$@"\n', "scontrol": 'echo "scontrol $*" >&2; exit 1\n'}
    starts = []
    for _ in range(2):
        (call,) = record_script(script, ws, ws.env, shims)
        cwd, argv = call
        starts.append(argv)
        result = run_cli(sized(argv, "train", ws.model), cwd, ws.env)
        check_result(cmd, result, cwd)
    assert "--overwrite" in starts[0] and shlex.join(starts[1]).endswith("--resume true"), starts


def run_report_skill_add(cmd: DocCommand, ws: Workspace) -> None:
    """The skills report's `add()` shell function, once per `add SKILL N` call on the page, in page order: `$1`
    and `$2` are the call's words and `--instructions "$(python -m bench.skills_demo.demo instructions $1)"`
    gets what that program prints."""
    calls = [line.split()[1:] for line in code_lines((ROOT / cmd.page).read_text())
             if re.fullmatch(r"add \S+ \d+", line)]
    assert calls, f"{cmd.page}: no `add SKILL N` call"
    for skill, count in calls:
        printed = program_output("bench.skills_demo.demo", ["instructions", skill])
        argv = [printed.strip() if a == PLACEHOLDER else a for a in cmd.argv]
        argv = sized(expand(argv, {**ws.variables, "1": skill, "2": count}), cmd.name, ws.model)
        result = run_cli(argv, ws.path, ws.env)
        check_result(cmd, result, ws.path)


def program_output(module: str, args: list[str]) -> str:
    """What ``python -m module args`` prints (run in-process)."""
    import contextlib
    import io
    import runpy

    out, saved = io.StringIO(), sys.argv
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    return out.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandIn(BaseHTTPRequestHandler):
    """An OpenAI-compatible server standing in for vLLM: lists a base model and answers a chat completion with
    the model it was asked for."""

    seen: list[dict] = []

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send({"object": "list", "data": [{"id": "base-model", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(body)
        self._send({"id": "c1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]})

    def log_message(self, *args: Any) -> None:
        pass


def run_skills_serve(cmd: DocCommand, ws: Workspace) -> None:
    """`loramix skills serve` is a server: started as its own process (the `loramix` entry, `python -m
    loramix.cli`), sent one routed chat request, stopped. Its `--upstream` is a stand-in server on a free port
    (vLLM is not installed here) and its `--port` a free one."""
    import httpx

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    argv, env = command_argv(cmd, ws)
    port = free_port()
    argv = set_flag(set_flag(argv, "--upstream", f"http://127.0.0.1:{upstream.server_port}"), "--port", str(port))
    log = ws.path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "loramix.cli", *argv], cwd=ws.path, env={**os.environ, **env},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        from helpers.serving import wait_ready

        wait_ready(httpx, proc, f"http://127.0.0.1:{port}", log, name="loramix skills serve", timeout=240,
                   interval=0.5)
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "auto", "messages": [{"role": "user", "content": "Summarize this dialogue:\n#Person1#: Did "
                                           "you hear about the trip?\n#Person2#: Yes, Anna told me."}]})
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        upstream.shutdown()
    assert reply.status_code == 200, reply.text
    skill = reply.headers["x-loramix-skill"]
    assert skill in ("sentiment", "summary") and StandIn.seen[-1]["model"] == skill, (skill, StandIn.seen)
    assert reply.json()["model"] == skill


def run_accelerate(cmd: DocCommand, ws: Workspace) -> None:
    """`accelerate launch --multi_gpu --num_processes 2 $(which loramix) train ...`: the launcher as written,
    the `loramix` console script of this environment, and for the page's `...` the tiny model, `data.jsonl`
    and an output directory (gloo on CPU)."""
    bin_dir = Path(sys.executable).parent
    launcher = [shutil.which("loramix", path=str(bin_dir)) if w == PLACEHOLDER else w
                for w in shlex.split(re.sub(r"\$\([^()]*\)", PLACEHOLDER, cmd.launcher))]
    launcher[0] = shutil.which(launcher[0], path=str(bin_dir)) or launcher[0]
    argv = sized([*cmd.argv, "--data", "data.jsonl", "--output-dir", "runs/ddp"], "train", ws.model)
    proc = subprocess.run([*launcher, *argv], cwd=ws.path, env={**os.environ, **ws.env}, capture_output=True,
                          text=True, timeout=600)
    result = Result(argv, proc.returncode, proc.stdout, proc.stderr)
    check_result(cmd, result, ws.path)
    digests = sorted((ws.path / "runs" / "ddp" / "rank_digests").glob("rank*.txt"))
    assert len(digests) == 2 and digests[0].read_text() == digests[1].read_text(), digests  # two processes


# --- the pages' other programs: python -m modules, python and bash scripts ---------------------------------------
PROGRAM = re.compile(r"^(?:[A-Za-z_]\w*=\S+\s+)*(?:\S*/)?(?P<prog>python3?|bash)\s+(?:-m\s+)?(?P<target>\S+)")


def page_programs() -> list[tuple[str, str, str]]:
    """(page, program, module or script) of each `python -m X`, `python script.py` and `bash script.sh` in the
    pages' code (each part of a `... && ...` line)."""
    found = []
    for page in PAGES:
        for line in code_lines(page.read_text()):
            for part in line.split("&&"):
                match = PROGRAM.match(part.strip())
                if match and (match.group("target"), page) not in {(t, p) for _, _, t, p in found}:
                    found.append((str(page.relative_to(ROOT)), match.group("prog"), match.group("target"), page))
    return [(page, prog, target) for page, prog, target, _ in found]


PROGRAM_SKIPS = {
    "pytest": "the test runner itself",
    "venv": "makes a virtual environment (the set-up; .ci/run builds one from scratch)",
    "scripts/setup.sh": "installs the packages from PyPI into .venv; .ci/run runs it from a fresh clone",
    "bench/gpu_check.sh": "needs a CUDA GPU; tests/test_gpu_check.py runs its dry run",
    "vllm.entrypoints.openai.api_server": "vLLM lives in its own virtualenv; the slow tests of "
                                          "tests/test_vllm_native.py and tests/test_skills_serving.py start this "
                                          "server when LORAMIX_VLLM_PYTHON names one",
    "$LLAMA/convert_hf_to_gguf.py": "llama.cpp's converter comes from a download (the llama-cpp-python sdist); "
                                    "the slow tests of tests/test_export_serving.py run it when "
                                    "LORAMIX_LLAMA_CPP_DIR names it",
    "scripts/quickstart.sh": "the main job: test_quickstart_main_job (slow suite, the packaged model)",
}
PROGRAMS = page_programs()


def test_the_pages_show_programs():
    targets = {t for _, _, t in PROGRAMS}
    assert {"bench.run_bench", "bench.probes.launches", "bench.skills_demo.demo", "scripts/quickstart.sh",
            "bench/lmeval_check/export_mc.py"} <= targets


@pytest.mark.parametrize("page,prog,target", [
    pytest.param(*p, marks=[pytest.mark.skip(reason=PROGRAM_SKIPS[p[2]])] if p[2] in PROGRAM_SKIPS else [],
                 id=f"{p[0]}: {p[1]} {p[2]}") for p in PROGRAMS])
def test_documented_program_answers_help(page, prog, target, capsys, monkeypatch):
    """Each module of a `python -m X` line imports and its `--help` prints its usage; each `python script.py`
    likewise (in-process, through runpy, as `python` would run it)."""
    import runpy

    assert prog.startswith("python"), f"{page}: no test runs {prog} {target}; add it to PROGRAM_SKIPS or run it"
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    assert e.value.code == 0, capsys.readouterr().err
    assert "usage:" in capsys.readouterr().out


# --- the main job ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_main_job(tmp_path):
    """README.md's and quickstart.md's main job, `bash scripts/quickstart.sh`, with the packaged
    SmolLM2-135M-Instruct, in a copy of the repository's scripts, configs and data: bash runs the script, and
    each `loramix` line it reaches runs in-process with the size flags of the other tests (2 steps, 4 new
    tokens). The set-up before it (`bash scripts/setup.sh && . .venv/bin/activate`) is .ci/run's."""
    from helpers.doc_data import write_data_dir

    for name in ("scripts", "configs", "data"):
        shutil.copytree(ROOT / name, tmp_path / name)
    ws = Workspace("README.md", tmp_path, None, write_data_dir(tmp_path / "datasets"), {})
    calls = record_script(tmp_path / "scripts" / "quickstart.sh", ws, ws.env)
    assert [argv[0] for _, argv in calls] == ["train", "generate", "generate"], calls
    for cwd, argv in calls:
        assert cwd == tmp_path
        cmd = DocCommand("scripts/quickstart.sh", shlex.join(argv), argv)
        result = run_cli(sized(argv, argv[0], None), cwd, ws.env)
        check_result(cmd, result, cwd)
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert "SmolLM2" in json.loads((tmp_path / "runs" / "quickstart" / "adapter" / "adapter_config.json")
                                   .read_text())["base_model_name_or_path"]
    assert summary["final_val_loss"] is not None
