"""Full disks: train, export and skills add stop with one line naming the directory, the bytes needed and the
bytes free; a failed checkpoint leaves no partial directory and the adapter of its step is saved alone; the
free space is compared with the expected checkpoint size before training.

A full disk is injected: ``torch.save`` / safetensors' ``save_file`` raise what they raise on a full disk
(``OSError(ENOSPC)``, torch's zip-writer ``RuntimeError``, safetensors' error text), and
``loramix.diskspace.free_bytes`` reports a small free space where a test needs one.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import loramix.checkpoint
import loramix.diskspace
import loramix.train
from helpers.tiny_lm import save_tiny_lm
from loramix.checkpoint import verify_adapter
from loramix.cli import main
from loramix.diskspace import DiskFullError, is_disk_full
from loramix.train import train

ROWS = [{"prompt": f"question {i}: how do I rest?", "response": f"answer {i}: sleep and breathe."} for i in range(32)]
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 9904896 vs 9904784"
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                    'message: "No space left on device" })')


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("disk")
    model_dir = save_tiny_lm(d / "model")
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    return model_dir, str(data)


def _opts(inputs, out: Path, **kw):
    model_dir, data = inputs
    opts = dict(model=model_dir, data=data, output_dir=str(out), max_steps=6, eval_steps=2, num_experts=2, top_k=1,
                r=2, attn_r=2, learning_rate=5e-3, batch_size=4, val_size=0, plots=False, seed=1)
    opts.update(kw)
    return opts


def full_when(monkeypatch, marker: str, error: BaseException) -> None:
    """torch.save raises ``error`` for any file whose path contains ``marker``."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if marker in str(f):
            raise error
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_the_shapes_of_a_full_disk_are_recognised(tmp_path, monkeypatch):
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(Exception(SAFETENSORS_FULL))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(RuntimeError(TORCH_FULL), tmp_path, needed=1000)  # the disk has room: another cause
    monkeypatch.setattr(loramix.diskspace, "free_bytes", lambda path: 10)
    assert is_disk_full(RuntimeError(TORCH_FULL), tmp_path, needed=1000)


def test_a_full_disk_at_a_checkpoint_removes_it_saves_the_adapter_alone_and_says_so_in_one_line(
        inputs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    full_when(monkeypatch, ".tmp-checkpoint-4", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(DiskFullError) as e:
        train(**_opts(inputs, run))
    msg = str(e.value)
    assert "\n" not in msg
    assert re.match(rf"{re.escape(str(run))}: the disk is full: checkpoint-4 needs about [\d,]+ bytes( \(.+?\))?, "
                    r"[\d,]+ bytes( \(.+?\))? are free; ", msg), msg
    assert f"its partial files (.tmp-checkpoint-4) were removed; the adapter of step 4 alone is saved in " \
           f"{run / 'adapter-step-4'}; free some space and continue from checkpoint-2 with --resume true" in msg, msg
    assert e.value.needed > 0 and e.value.saved == run / "adapter-step-4"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["adapter-step-4", "checkpoint-2"]
    verify_adapter(run / "adapter-step-4")
    assert loramix.train.checkpoint_problem(run / "checkpoint-2") is None  # the earlier checkpoint is intact
    # the adapter saved alone holds the weights of step 4: those of checkpoint-4 of the same run without the fault
    monkeypatch.undo()
    straight = tmp_path / "straight"
    train(**_opts(inputs, straight))
    a, b = (load_file(d / "adapter_model.safetensors") for d in (run / "adapter-step-4", straight / "checkpoint-4"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torch_saves_own_error_on_a_full_disk_becomes_one_line_from_the_cli(inputs, tmp_path, monkeypatch, capsys):
    """torch.save's zip-writer error ("unexpected pos ...", naming neither disk nor path) on a disk with less
    free space than the checkpoint needs: exit 2 with one line that says the disk is full."""
    run = tmp_path / "run"
    state = {"full": False}
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if ".tmp-checkpoint-2" in str(f):
            state["full"] = True
            raise RuntimeError(TORCH_FULL)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    real_free = loramix.diskspace.free_bytes
    monkeypatch.setattr(loramix.diskspace, "free_bytes", lambda path: 5000 if state["full"] else real_free(path))
    model_dir, data = inputs
    rc = main(["train", "--model", model_dir, "--data", data, "--output-dir", str(run), "--max-steps", "4",
               "--eval-steps", "2", "--num-experts", "2", "--r", "2", "--attn-r", "0", "--val-size", "0",
               "--no-plots"])
    captured = capsys.readouterr().err
    err = [line for line in captured.splitlines() if line.startswith("loramix:")]
    assert rc == 2 and len(err) == 1, captured[-3000:]
    assert err[0].startswith(f"loramix: error: {run}: the disk is full: checkpoint-2 needs about ")
    assert "5,000 bytes (4.88 KiB) are free" in err[0] and "unexpected pos" not in err[0]
    assert f"the adapter of step 2 alone is saved in {run / 'adapter-step-2'}" in err[0]
    assert not (run / ".tmp-checkpoint-2").exists() and not (run / "summary.json").exists()


def test_when_the_adapter_alone_does_not_fit_either_nothing_partial_is_left(inputs, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def save_file(*args, **kwargs):
        raise Exception(SAFETENSORS_FULL)  # safetensors' error on a full disk (not an OSError)

    monkeypatch.setattr(loramix.checkpoint, "save_file", save_file)
    with pytest.raises(DiskFullError, match=r"checkpoint-2 needs about .*; its partial files \(\.tmp-checkpoint-2\) "
                                            r"were removed; the adapter of step 2 alone could not be saved either$"):
        train(**_opts(inputs, run))
    left = sorted(p.name for p in run.rglob("*"))
    assert left == ["metrics.jsonl", "resolved_config.yaml"], left  # no temporary file, no partial directory


def test_a_full_disk_at_the_final_adapter_names_it_and_keeps_the_checkpoints(inputs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = loramix.train.save_adapter

    def save_adapter(model, directory, tensors=None):
        if Path(directory).name == "adapter":
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real(model, directory, tensors)

    monkeypatch.setattr(loramix.train, "save_adapter", save_adapter)
    with pytest.raises(DiskFullError, match=rf"^{run}: the disk is full: the adapter needs [\d,]+ bytes.*are free; its "
                                            r"partial files \(adapter\) were removed; the checkpoints are kept "
                                            r"\(checkpoint-4, checkpoint-6\)$"):
        train(**_opts(inputs, run))
    assert not (run / "adapter").exists()


def test_free_space_is_compared_with_the_checkpoint_size_before_training(inputs, tmp_path, monkeypatch, caplog):
    """Less than one checkpoint and the adapter: refused before the first step. Less than what the run keeps
    at once (save_total_limit + 1 checkpoints and the adapter): a warning, and the run trains."""
    monkeypatch.setattr(loramix.train, "expected_checkpoint_bytes", lambda model: (1000, 100))
    started = []

    class Started(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started.append(state.global_step)

    monkeypatch.setattr(loramix.diskspace, "free_bytes", lambda path: 1050)
    with pytest.raises(DiskFullError, match=rf"^{tmp_path / 'a'}: not enough free disk space: one checkpoint and the "
                                            r"adapter needs about 1,100 bytes \(1.07 KiB\), 1,050 bytes \(1.03 KiB\) "
                                            r"are free$"):
        train(**_opts(inputs, tmp_path / "a"), callbacks=[Started()])
    assert started == []
    monkeypatch.setattr(loramix.diskspace, "free_bytes", lambda path: 2000)
    with caplog.at_level(logging.WARNING, logger="loramix.diskspace"):
        summary = train(**_opts(inputs, tmp_path / "b", max_steps=2))
    assert summary["steps"] == 2
    assert "3 checkpoints (--save-total-limit 2, and one more while the next is written) and the adapter needs " \
           "about 3,100 bytes (3.03 KiB), 2,000 bytes (1.95 KiB) are free" in caplog.text


def test_the_expected_checkpoint_size_is_close_to_the_real_one(inputs, tmp_path):
    seen = {}

    class Keep(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen["model"] = model

    run = tmp_path / "run"
    train(**_opts(inputs, run, max_steps=2, eval_steps=2, r=8, attn_r=8), callbacks=[Keep()])
    checkpoint, adapter = loramix.train.expected_checkpoint_bytes(seen["model"])
    real_checkpoint = sum(f.stat().st_size for f in (run / "checkpoint-2").rglob("*") if f.is_file())
    real_adapter = sum(f.stat().st_size for f in (run / "adapter").glob("adapter_*"))
    assert real_checkpoint <= checkpoint <= 1.5 * real_checkpoint, (checkpoint, real_checkpoint)
    assert real_adapter <= adapter <= 1.5 * real_adapter, (adapter, real_adapter)


# --- export -------------------------------------------------------------------------------------------
def _adapted():
    from helpers.tiny_models import tiny_model
    from loramix import MixLoraConfig, inject

    return inject(tiny_model("llama", seed=0), MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4)).eval()


def test_export_on_a_full_disk_says_so_and_leaves_no_staging_directory(tmp_path, monkeypatch):
    import safetensors.torch

    from helpers.tiny_tokenizer import tiny_tokenizer
    from loramix.export import export_adapted

    def save_file(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(DiskFullError, match=rf"^{tmp_path}: the disk is full: the exported model needs [\d,]+ bytes"
                                            r".* are free; its partial files \(\.out\.loramix-export-\w+\) were "
                                            r"removed$"):
        export_adapted(_adapted(), tmp_path / "out", tiny_tokenizer())
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(loramix.diskspace, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match=rf"^{tmp_path}: not enough free disk space: the exported model needs "
                                            r"about [\d,]+ bytes .*1,000 bytes are free$"):
        export_adapted(_adapted(), tmp_path / "out", tiny_tokenizer())
    assert list(tmp_path.iterdir()) == []


# --- skills add -----------------------------------------------------------------------------------------
def test_skills_add_on_a_full_disk_adds_nothing_and_says_so(inputs, tmp_path, monkeypatch):
    import loramix.skills.api
    from loramix.skills import SkillLibrary, skills_add

    model_dir, data = inputs
    opts = dict(embedder="base", device="cpu", max_steps=2, batch_size=4, val_size=0, r=2, attn_r=2, num_experts=2,
                top_k=1, gate_variants=8, gate_mixed=4)
    root = tmp_path / "lib"
    skills_add(str(root), "first", data, model=model_dir, **opts)
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))

    def save_prompt_embeddings(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loramix.skills.api, "save_prompt_embeddings", save_prompt_embeddings)
    with pytest.raises(DiskFullError, match=rf"^{root}: the disk is full: adding skill 'second' needs at least "
                                            r"[\d,]+ bytes.* are free; the skill was not added and its partial files "
                                            r"were removed$"):
        skills_add(str(root), "second", data, **opts)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before
    assert SkillLibrary.open(root).names == ["first"]
