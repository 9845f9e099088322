"""The CLI is a thin layer: flags come from the config dataclasses / function signatures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loramix.cli import build_parser, field_docs, main, parse_value
from loramix.config import MixLoraConfig
from loramix.train import resolve
from tiny_lm import save_tiny_lm

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_every_subcommand_has_help():
    """Each sub-command builds and documents its flags."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "generate", "chat", "eval", "compare", "bench"} <= set(sub.choices)
    train_help = sub.choices["train"].format_help()
    assert "--num-experts" in train_help and "--router" in train_help and "--max-length" in train_help
    assert "top_k" in field_docs(MixLoraConfig) and "Experts per token" in field_docs(MixLoraConfig)["top_k"]


def test_flag_values_parse_like_yaml_and_numbers():
    """Numbers (including 5e-3, which YAML 1.1 reads as text), lists and maps parse to Python values."""
    assert parse_value("5e-3") == 0.005 and parse_value("8") == 8
    assert parse_value("[4, 8]") == [4, 8] and parse_value("{0: 2}") == {0: 2}
    assert parse_value("true") is True and parse_value("topk") == "topk"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_resolve(path, monkeypatch, tmp_path):
    """Every shipped YAML recipe names only known options with valid values."""
    monkeypatch.setenv("LORAMIX_DATA_DIR", str(tmp_path))
    train_cfg, data_cfg, mix_cfg = resolve(path)
    assert data_cfg.data.startswith(str(tmp_path))  # $LORAMIX_DATA_DIR expanded
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
    rc = main(["train", "--model", model_dir, "--data", str(tmp_path / "missing.jsonl"),
               "--output-dir", str(tmp_path / "run2")])
    assert rc == 2
    assert "missing.jsonl" in capsys.readouterr().err
