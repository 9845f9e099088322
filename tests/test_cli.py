"""The CLI is a thin layer: flags come from the config dataclasses / function signatures."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from helpers.tiny_lm import save_tiny_lm
from loramix.cli import build_parser, field_docs, main, parse
from loramix.config import MixLoraConfig
from loramix.train import resolve

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_every_subcommand_has_help():
    """Each sub-command builds and documents its flags."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "generate", "chat", "eval", "compare", "bench"} <= set(sub.choices)
    train_help = sub.choices["train"].format_help()
    assert "--num-experts" in train_help and "--router" in train_help and "--max-length" in train_help
    assert "top_k" in field_docs(MixLoraConfig) and "Experts per token" in field_docs(MixLoraConfig)["top_k"]


def test_flag_values_parse_by_type_and_leave_unset_flags_out():
    """Numbers (including 5e-3, which YAML 1.1 reads as text), lists and maps parse to Python values by the
    option's type; booleans take --flag/--no-flag; flags not given are left out, so --config values stand."""
    from loramix.train import train

    fn, kwargs = parse(["train", "--learning-rate", "5e-3", "--num-experts", "[4, 8]", "--router", "topk",
                        "--no-plots", "--packing", "--resume", "true", "--config", "c.yaml"])
    assert fn is train
    assert kwargs == {"learning_rate": 0.005, "num_experts": [4, 8], "router": "topk", "plots": False,
                      "packing": True, "resume": True, "config": "c.yaml"}
    assert parse(["train", "--num-experts", "{0: 2}", "--resume", "runs/x/checkpoint-4"])[1] == {
        "num_experts": {0: 2}, "resume": "runs/x/checkpoint-4"}
    assert parse(["train", "--val-size", "4"])[1] == {"val_size": 4}  # a row count stays an int
    assert parse(["train", "--val-size", "0.1"])[1] == {"val_size": 0.1}
    fn, kwargs = parse(["skills", "route", "hello", "hi there", "--library-dir", "lib"])
    assert fn.__name__ == "skills_route" and kwargs == {"prompts": ["hello", "hi there"], "library_dir": "lib"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_resolve(path, monkeypatch, tmp_path):
    """Every shipped YAML recipe names only known options with valid values, and data that is either under
    $LORAMIX_DATA_DIR or shipped in this repository (the main job's sample)."""
    monkeypatch.setenv("LORAMIX_DATA_DIR", str(tmp_path))
    train_cfg, data_cfg, mix_cfg = resolve(path)
    for source in data_cfg.data.split(","):
        assert source.startswith(str(tmp_path)) or (ROOT / source).is_file(), source  # $LORAMIX_DATA_DIR expanded
    assert mix_cfg.num_experts >= 1 and train_cfg.learning_rate > 0


def test_cli_train_runs_and_reports_bad_input(tmp_path, capsys):
    """`loramix train` trains a tiny model from flags; a missing data file is a clean error (exit 2)."""
    model_dir = save_tiny_lm(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) for i in range(12)))
    rc = main(["train", "--model", model_dir, "--data", str(data), "--output-dir", str(tmp_path / "run"),
               "--max-steps", "2", "--num-experts", "2", "--r", "2", "--attn-r", "0", "--val-size", "0",
               "--no-plots", "--learning-rate", "1e-3"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    out = capsys.readouterr().out  # a few lines for people; the figures stay in summary.json
    assert out.startswith("Trained 2 steps in ") and str(tmp_path / "run" / "adapter") in out
    assert len(out.splitlines()) <= 6 and "{" not in out, out
    rc = main(["train", "--model", model_dir, "--data", str(tmp_path / "missing.jsonl"),
               "--output-dir", str(tmp_path / "run2")])
    assert rc == 2
    assert "missing.jsonl" in capsys.readouterr().err


# --- ordinary mistakes: exit 2 with one line naming the flag, field or file ---------------------------------
def _subcommands(parser=None, prefix=()):
    """(argv prefix, sub-parser) of every runnable command, nested ones (skills add, ...) included."""
    import argparse

    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = list(_subcommands(sub, (*prefix, name)))
                yield from nested or [((*prefix, name), sub)]


def _flags(sub, kinds):
    """(flag, dest, type) of the options whose type is int, float or a list/map ("yaml")."""

    def kind_of(text):
        text = text.removesuffix(" | None")
        return "yaml" if "list" in text or "dict" in text else text

    return [(a.option_strings[0], a.dest, sub._flag_kinds[a.dest]) for a in sub._actions
            if a.option_strings and a.dest in sub._flag_kinds and kind_of(sub._flag_kinds[a.dest]) in kinds]


BAD_VALUES = {"int": ["abc", "1.5"], "float": ["fast"], "yaml": ["[4", "{a: [1"]}


@pytest.fixture()
def one_parser(monkeypatch):
    """main() builds the parser once for the whole test (building it reads every command's docstrings)."""
    import functools

    from loramix import cli

    monkeypatch.setattr(cli, "build_parser", functools.lru_cache(cli.build_parser))


def test_every_command_refuses_badly_typed_values_in_one_line(capsys, one_parser):
    """Every flag of every command that takes a number, list or map gets malformed values: each is an
    argparse error (exit 2) on one line naming the flag, never a traceback."""

    seen = set()
    for prefix, sub in _subcommands():
        for kind, values in BAD_VALUES.items():
            for flag, _, _ in _flags(sub, [kind]):
                for value in values:
                    with pytest.raises(SystemExit) as e:
                        main([*prefix, f"{flag}={value}"])
                    err = capsys.readouterr().err
                    assert e.value.code == 2, (prefix, flag, value)
                    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
                    assert f"argument {flag}" in err and value in err, err
                    seen.add((prefix[0], kind))
    assert {("train", "int"), ("train", "float"), ("train", "yaml"), ("eval", "int"), ("generate", "float"),
            ("skills", "int"), ("continual", "int"), ("bench", "yaml")} <= seen


# Options whose every int is meaningful; every other integer option of every command refuses -5.
ANY_INT = {"seed", "embed_layer", "max_steps"}


def _required_args(prefix, tmp_path):
    nowhere = str(tmp_path / "no-model")
    data = str(tmp_path / "d.jsonl")
    return {
        "train": ["--data", data, "--output-dir", str(tmp_path / "o"), "--model", nowhere],
        "generate": ["--prompt", "hi", "--model", nowhere],
        "chat": ["--model", nowhere],
        "eval": ["--tasks", "[wikitext2]", "--model", nowhere, "--data-dir", str(tmp_path)],
        "compare": ["--data", data, "--model", nowhere, "--output-dir", str(tmp_path / "c")],
        "bench": ["--model", nowhere],
        "continual": ["--model", nowhere, "--output-dir", str(tmp_path / "cl")],
        "export": ["--adapter", str(tmp_path / "no-adapter"), "--output-dir", str(tmp_path / "x"), "--model", nowhere],
        "add": ["s1", "--library-dir", str(tmp_path / "lib"), "--data", data],
        "route": ["hi", "--library-dir", str(tmp_path / "lib")],
        "generate-skills": ["hi", "--library-dir", str(tmp_path / "lib")],
        "compare-static": ["hi", "--library-dir", str(tmp_path / "lib")],
        "serve": ["--export-dir", str(tmp_path / "no-export")],
    }["generate-skills" if prefix == ("skills", "generate") else prefix[-1]]


def test_every_count_option_refuses_negative_values_before_loading_anything(tmp_path, capsys, one_parser):
    """Each integer option of each command (counts, sizes, limits) refuses -5 with exit 2 and one line naming
    it, before any model or data is loaded (the model path does not exist, so a later failure would name it)."""
    checked = []
    for prefix, sub in _subcommands():
        if prefix == ("skills", "list"):
            continue
        flags = _flags(sub, ["int"])
        if prefix in (("train",), ("skills", "add")):
            flags += [("--num-experts", "num_experts", None), ("--val-size", "val_size", None)]
        for flag, dest, _ in flags:
            if dest in ANY_INT:
                continue
            rc = main([*prefix, *_required_args(prefix, tmp_path), flag, "-5"])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and err, (prefix, flag)
            assert flag in err[-1] or dest.removeprefix("gate_") in err[-1], (prefix, flag, err[-1])
            assert "no-model" not in err[-1], (prefix, flag, err[-1])
            checked.append((prefix, dest))
    assert ((("eval",), "limit") in checked and (("train",), "batch_size") in checked
            and (("bench",), "warmup") in checked and (("skills", "generate"), "max_new_tokens") in checked)


@pytest.mark.parametrize("argv, names", [
    (["eval", "--tasks", "[boolq]", "--limit", "0"], "--limit"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["chat", "--repetition-penalty", "-1"], "--repetition-penalty"),
    (["bench", "--steps", "0"], "--steps"),
    (["compare", "--data", "x.jsonl", "--eval-limit", "0"], "--eval-limit"),
    (["train", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size"),
    (["train", "--data", "x.jsonl", "--num-experts", "0", "--attn-r", "0"], "--num-experts"),
])
def test_zero_counts_are_refused(tmp_path, capsys, argv, names):
    """A bad count from the command line is refused naming its flag (the library's message names the field)."""
    rc = main([*argv, "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"error: {names}:" in err[0], err


def test_config_file_and_flag_mistakes_name_the_file_or_field(tmp_path, capsys):
    """A YAML syntax error in --config names the file and line; a value of the wrong type in the file
    names the field; an unparsable list flag names the flag. Always exit 2 and one line."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: x.jsonl\nlearning_rate: 1.0e-3\nnum_experts: [4\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.yaml: not valid YAML: line" in err[0], err
    cfg.write_text("data: x.jsonl\nbatch_size: four\n")
    assert main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TrainConfig.batch_size: must be an int >= 1, got 'four'" in err[0], err
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x.jsonl", "--num-experts", "[4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "argument --num-experts: cannot read '[4'" in err[0], err


def test_train_into_a_finished_run_is_refused_by_the_cli(tmp_path, capsys):
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    rc = main(["train", "--data", "x.jsonl", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0], err


@pytest.mark.parametrize(("signum", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_and_sigterm_exit_128_plus_the_signal_after_the_checkpoint_is_saved(
        tmp_path, monkeypatch, capsys, signum, status):
    """A run stopped by Ctrl-C or by SIGTERM (a scheduler's preemption) during step 2 saves its checkpoint and
    exits 128 + the signal's number (130, 143), not 0."""
    import os
    import signal

    import loramix.train

    sig = getattr(signal, signum)

    def unhandled(signo, frame):  # what would happen without training's handler: the process dies
        raise RuntimeError(f"{signum} was not handled by loramix train")

    previous = signal.signal(sig, unhandled)

    class InterruptAt2(loramix.train.InterruptCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(loramix.train, "InterruptCallback", InterruptAt2)
    model_dir = save_tiny_lm(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) for i in range(12)))
    try:
        rc = main(["train", "--model", model_dir, "--data", str(data), "--output-dir", str(tmp_path / "run"),
                   "--max-steps", "6", "--num-experts", "2", "--r", "2", "--attn-r", "0", "--val-size", "0",
                   "--no-plots"])
    finally:
        assert signal.signal(sig, previous) is unhandled  # training put the handler it found back
    err = capsys.readouterr().err
    assert rc == status, err
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stop_signal"] == signum and summary["steps"] == 2
    assert f"interrupted by {signum}; the checkpoint is saved" in err


def test_a_second_sigterm_aborts_with_143(tmp_path, monkeypatch, capsys):
    """SIGTERM, then SIGTERM again (later than a launcher's repeat of the first): the run aborts at once,
    exit 143, without a checkpoint of the step it was in."""
    import os
    import signal

    import loramix.stopping
    import loramix.train

    class TwiceAt2(loramix.train.InterruptCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loramix.train, "InterruptCallback", TwiceAt2)
    monkeypatch.setattr(loramix.stopping, "REPEAT_WINDOW_S", 0.0)
    model_dir = save_tiny_lm(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) for i in range(12)))
    rc = main(["train", "--model", model_dir, "--data", str(data), "--output-dir", str(tmp_path / "run"),
               "--max-steps", "6", "--num-experts", "2", "--r", "2", "--attn-r", "0", "--val-size", "0",
               "--no-plots"])
    assert rc == 143
    assert "aborted by SIGTERM" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("checkpoint-*")) and not (tmp_path / "run" / "summary.json").exists()


def test_compare_refuses_earlier_runs_before_any_work_unless_overwrite(tmp_path, monkeypatch):
    """`loramix compare` into a directory with earlier runs fails before the base model is evaluated;
    --overwrite passes overwrite=True to every training run."""
    import loramix.compare
    from loramix.cli.commands import compare_command
    from loramix.config import ConfigError

    calls = []
    monkeypatch.setattr(loramix.compare, "compare", lambda data, **kw: calls.append(kw) or {})
    (tmp_path / "c" / "lora" / "adapter").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"compare: .*lora is not empty; pass --overwrite"):
        compare_command(data="x.jsonl", output_dir=str(tmp_path / "c"))
    assert calls == []
    compare_command(data="x.jsonl", output_dir=str(tmp_path / "c"), overwrite=True)
    assert calls and calls[0]["overwrite"] is True


def test_strict_base_flag_refuses_an_adapter_of_another_base(tmp_path, capsys):
    """generate/eval --strict-base turn the other-base warning into exit 2 naming both bases."""
    from loramix import MixLoraConfig, inject, save_adapter
    from loramix.models import load_base_model

    trained_on = save_tiny_lm(tmp_path / "a", seed=0)
    other = save_tiny_lm(tmp_path / "b", seed=1)
    base, _ = load_base_model(trained_on, device="cpu")
    save_adapter(inject(base, MixLoraConfig(num_experts=2, r=2, attn_r=0)), tmp_path / "adapter")
    argv = ["generate", "--prompt", "hi", "--model", other, "--adapter", str(tmp_path / "adapter"),
            "--max-new-tokens", "2", "--device", "cpu"]
    assert main([*argv, "--strict-base"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "weights differ" in last and str(tmp_path / "a") in last and str(tmp_path / "b") in last, last
    with pytest.warns(UserWarning, match="weights differ"):
        assert main(argv) == 0


def test_cli_keeps_the_bitsandbytes_kernels_notice_out_of_its_output(tmp_path) -> None:
    """Neither `loramix train --help` nor a training run prints bitsandbytes' missing-kernels notice (transformers
    and peft import bitsandbytes when it is installed; `import loramix` filters the notice first)."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    out = subprocess.run([sys.executable, "-m", "loramix.cli", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout
    assert "kernels-community" not in out.stderr + out.stdout
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) for i in range(8)))
    out = subprocess.run([sys.executable, "-m", "loramix.cli", "train", "--model", save_tiny_lm(tmp_path / "m"),
                          "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                          "--num-experts", "2", "--r", "2", "--attn-r", "0", "--val-size", "0", "--no-plots"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "kernels-community" not in out.stderr + out.stdout


def test_configuration_page_matches_the_config_dataclasses():
    """docs/configuration.md is written from the dataclasses; regenerate it when a field changes:
    ``python -m loramix.cli.reference docs/configuration.md``."""
    from loramix.cli.reference import configuration_markdown

    text = configuration_markdown()
    assert "| `num_experts` |" in text and "| `learning_rate` |" in text and "Experts per token" in text
    assert (ROOT / "docs" / "configuration.md").read_text() == text, (
        "docs/configuration.md is out of date: python -m loramix.cli.reference docs/configuration.md")


def test_bench_passes_the_export_decode_options_to_the_harness(monkeypatch, capsys):
    """``loramix bench --export-decode --vllm-python P --threads 1`` reaches run_benchmark unchanged."""
    import types

    from loramix.cli import commands

    seen = {}
    fake = types.SimpleNamespace(run_benchmark=lambda model, **kw: seen.update(kw, model=model) or {"rows": []},
                                 format_table=lambda result: "table")
    monkeypatch.setattr(commands, "bench_harness", lambda: fake)
    assert main(["bench", "--export-decode", "--vllm-python", "/v/bin/python", "--threads", "1",
                 "--routers", "[topk]", "--no-include-official"]) == 0
    assert seen["export_decode"] is True and seen["vllm_python"] == "/v/bin/python" and seen["threads"] == 1
    assert seen["routers"] == ["topk"] and seen["include_official"] is False and seen["model"] is None
    assert capsys.readouterr().out.strip() == "table"
    assert main(["bench", "--threads", "0"]) == 2 and "threads" in capsys.readouterr().err


def test_help_documents_every_flag_of_every_command():
    """Each flag's help has a text from the function's Args: section or the field's docstring."""
    from loramix.cli import COMMANDS, Command, _resolve, field_docs, param_docs

    def commands():
        for name, cmd in COMMANDS.items():
            yield from ([(name, cmd)] if isinstance(cmd, Command) else [(f"{name} {s}", c) for s, c in cmd.items()])

    undocumented = []
    for name, cmd in commands():
        fn = _resolve(cmd.fn)
        docs = param_docs(fn)
        for pname, param in inspect.signature(fn).parameters.items():
            flag = param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and pname != "callbacks"
            if flag and not docs.get(pname):
                undocumented.append(f"{name}: {pname}")
        for ref in cmd.option_classes:
            cls = _resolve(ref)
            fields = field_docs(cls)
            undocumented += [f"{name}: {cls.__name__}.{f.name}" for f in dataclasses.fields(cls)
                             if f.init and not fields.get(f.name)]
    assert not undocumented, sorted(set(undocumented))


def test_command_table_matches_the_code():
    """spec.json (what the parser is built from) is the table read from the command functions and option
    dataclasses; regenerate it when a signature, docstring or field changes: ``python -m loramix.cli.spec``."""
    from loramix.cli import SPEC_FILE
    from loramix.cli.spec import spec_json

    assert SPEC_FILE.read_text() == spec_json(), "src/loramix/cli/spec.json is out of date: python -m loramix.cli.spec"


HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate", "numpy", "matplotlib", "safetensors", "gguf")


def test_help_imports_no_heavy_module():
    """`loramix --help` and every `loramix <command> --help` print without importing torch, transformers and the
    like (they load when a command runs), so help answers at once."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys\n"
        "import loramix.cli as cli\n"
        "parser = cli.build_parser()\n"
        "helps = [[]] + [[n] for n in cli.COMMANDS]"
        " + [['skills', s] for s in cli.COMMANDS['skills']]\n"
        "for argv in helps:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        cli.main([*argv, '--help'])\n"
        "    assert 'usage: loramix' in out.getvalue(), argv\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_import_loramix_is_light_and_every_public_name_resolves():
    """`import loramix` loads no torch; each name of loramix.__all__ (and a submodule) is there on first use."""
    import subprocess
    import sys

    code = (
        "import sys, loramix\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
        "from loramix import inject, MixLoraConfig, load_adapter\n"
        "assert all(getattr(loramix, n) is not None for n in loramix.__all__)\n"
        "assert loramix.train.train and 'inject' in dir(loramix)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]", "ok"]
    with pytest.raises(AttributeError, match="no_such_name"):
        import loramix

        loramix.no_such_name  # noqa: B018


def test_help_shows_whole_summaries_in_plain_text(capsys):
    """The command list shows each command's whole first paragraph (no summary cut mid-sentence), and no help
    text prints reST markup (``x``, :func:`x`)."""
    import re

    from loramix.cli import COMMANDS, command_table

    table = command_table()
    texts = []
    for argv in [[], *([n] for n in COMMANDS), *(["skills", s] for s in COMMANDS["skills"])]:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        texts.append(capsys.readouterr().out)
    top = " ".join(texts[0].split())
    for name, entry in table.items():
        assert entry["summary"].endswith((".", ")")) or "commands" in entry, (name, entry["summary"])
        assert f"{name} {entry['summary']}" in top, name
    for text in texts:
        assert "``" not in text and not re.search(r":[a-z]+:`", text), text
    assert "Args:" not in texts[1] and "--num-experts" in texts[1]


def test_errors_name_the_flags_of_the_command():
    """Library messages name options as Python does (data_dir=..., TrainConfig.output_dir:); the command line
    prints them as its flags, and leaves ordinary words and file paths alone."""
    from loramix.cli import flag_message

    names = ["data_dir", "max_steps", "output_dir", "model", "max_length", "stride", "val_size"]
    assert flag_message("no data directory: pass data_dir=... or set LORAMIX_DATA_DIR", names) == (
        "no data directory: pass --data-dir=... or set LORAMIX_DATA_DIR")
    assert flag_message("TrainConfig.output_dir: /x/output_dir is not empty; choose another --output-dir",
                        names) == "--output-dir: /x/output_dir is not empty; choose another --output-dir"
    assert flag_message("stride: must be <= max_length=1024, got 2000", names) == (
        "--stride: must be <= --max-length=1024, got 2000")
    assert flag_message("model: could not load the model", names) == "--model: could not load the model"
    assert flag_message("DataConfig.val_size: too many; lower val_size.", names) == (
        "--val-size: too many; lower --val-size.")
    assert flag_message("cannot read max_steps.yaml in runs/max_steps", names) == (
        "cannot read max_steps.yaml in runs/max_steps")


def test_eval_checks_its_data_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`loramix eval` with no data directory, or one without the task's file, fails at once naming --data-dir
    or the file, before the model loads (a model that does not exist would fail otherwise)."""
    monkeypatch.delenv("LORAMIX_DATA_DIR", raising=False)
    missing_model = str(tmp_path / "no-model")
    assert main(["eval", "--tasks", "[boolq]", "--model", missing_model]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "data_dir" not in err and "no-model" not in err, err
    assert main(["eval", "--tasks", "[boolq]", "--model", missing_model, "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "boolq" in err and str(tmp_path) in err and "no-model" not in err, err


def test_compare_checks_its_files_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """`loramix compare` refuses a missing data directory or training file before any model loads (a model that
    does not exist would fail otherwise) and before its output directory is made."""
    monkeypatch.delenv("LORAMIX_DATA_DIR", raising=False)
    argv = ["compare", "--model", str(tmp_path / "no-model"), "--output-dir", str(tmp_path / "cmp")]
    assert main([*argv, "--data", str(tmp_path / "train.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "no-model" not in err, err
    (tmp_path / "llm_adapters_commonsense" / "boolq").mkdir(parents=True)
    (tmp_path / "llm_adapters_commonsense" / "boolq" / "test.json").write_text("[]")
    assert main([*argv, "--data", str(tmp_path / "train.jsonl"), "--tasks", "[boolq]", "--data-dir",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl" in err and "no-model" not in err, err
    assert not (tmp_path / "cmp").exists()


def test_export_refuses_a_non_empty_output_dir_before_the_model_loads(tmp_path, capsys):
    """`loramix export` into a non-empty directory fails naming --output-dir and --overwrite before the model
    loads (a model that does not exist would fail otherwise)."""
    from helpers.tiny_models import tiny_model
    from loramix import MixLoraConfig, inject, save_adapter

    save_adapter(inject(tiny_model("llama"), MixLoraConfig(num_experts=2, r=2)), tmp_path / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out"),
                 "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "--overwrite" in err and "no-model" not in err, err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
