"""Training recipe on tiny local models: end to end, resume, interrupt, divergence, multi-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers.tiny_lm import save_tiny_lm
from loramix.config import ConfigError
from loramix.train import TrainingDivergedError, resolve, summary_text, train

ROWS = [{"Context": f"question {i}: how do I cope with stress at work?",
         "Response": f"answer {i}: breathe, rest and talk to someone you trust."} for i in range(48)]


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    model_dir = save_tiny_lm(d / "model")
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    return model_dir, str(data)


def _opts(model_dir, data, out, **kw):
    opts = dict(model=model_dir, data=data, output_dir=str(out), max_steps=6, eval_steps=3, num_experts=4,
                top_k=2, r=4, attn_r=4, learning_rate=5e-3, batch_size=4, val_size=0, plots=False, seed=1)
    opts.update(kw)
    return opts


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_train_end_to_end_writes_adapter_metrics_plots(tiny_run_inputs, tmp_path):
    """A run writes the adapter, resolved config, metrics with aux loss, plots, and lowers val loss."""
    model_dir, data = tiny_run_inputs
    s = train(**_opts(model_dir, data, tmp_path / "run", max_steps=12, val_size=8, plots=True))
    run = tmp_path / "run"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "resolved_config.yaml",
                 "metrics.jsonl", "summary.json", "loss_curves.png", "expert_utilisation.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 12 and all("aux_loss" in r and "tokens_per_s" in r for r in train_rows)
    assert s["final_val_loss"] < s["base_val_loss"]
    assert s["steps"] == 12
    best = Path(s["best_checkpoint"])  # the renamed checkpoint, not its staging directory
    assert best.parent == run and best.name.startswith("checkpoint-") and best.is_dir()
    for key in ("expert_share", "val_expert_share"):  # over training, and of the final model on validation
        shares = torch.tensor(s[key])
        assert shares.shape[0] == 2 and torch.allclose(shares.sum(-1), torch.ones(2)), key
    assert s["val_expert_share_min"] == pytest.approx(float(torch.tensor(s["val_expert_share"]).min()))
    text = summary_text(s)  # what `loramix train` prints
    assert text.startswith("Trained 12 steps in ") and "s per step" in text
    assert f"{s['base_val_loss']:.3f} before training, {s['final_val_loss']:.3f} with the adapter" in text
    assert f"Adapter: {run / 'adapter'}" in text and "summary.json" in text and "loss_curves.png" in text
    assert "expert_share" not in text and len(text.splitlines()) <= 6


def test_summary_text_names_the_saved_checkpoint_an_interruption_and_minutes(tmp_path):
    s = {"output_dir": str(tmp_path), "adapter_dir": str(tmp_path / "adapter"), "steps": 40, "precision": "fp32",
         "interrupted": True, "resumed_from": None, "diverged": None, "train_seconds": 125.0,
         "trainable_params": 1_500_000, "total_params": 136_000_000, "base_val_loss": 2.5, "final_val_loss": 2.25,
         "best_val_loss": 2.25, "best_checkpoint": str(tmp_path / "checkpoint-30"), "data": {"summary": "8 rows"}}
    (tmp_path / "adapter").mkdir()
    text = summary_text(s)
    assert text.splitlines()[0] == ("Trained 40 steps in 2 min 5 s, 3.1 s per step (fp32; 1.5 M of 136 M "
                                    "parameters trainable).")
    assert "2.500 before training, 2.250 with the adapter (the adapter of checkpoint-30" in text
    assert "Interrupted: continue with --resume true" in text and "Data: 8 rows." in text
    assert f"Files in {tmp_path}/: adapter/ (" in text
    small = summary_text({**s, "trainable_params": 41_216, "total_params": 500_000})  # a tiny model: no "0.0 M"
    assert "(fp32; 41,216 of 500,000 parameters trainable)" in small.splitlines()[0]


def test_cli_train_reports_the_final_validation_once(tmp_path, capsys):
    """The progress output names each validation once (the final one is in the summary, not repeated)."""
    from loramix.cli import main

    model_dir = save_tiny_lm(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) for i in range(16)))
    assert main(["train", "--model", model_dir, "--data", str(data), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "2", "--eval-steps", "2", "--val-size", "4", "--no-plots"]) == 0
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).replace("\r", "\n").splitlines()
    assert sum("step 2: validation loss" in line for line in lines) == 1, lines


def test_expert_shares_ignore_padding_columns_of_smaller_layers():
    from loramix.train import expert_shares

    counts = torch.tensor([[3, 1, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]])  # layer 0 has 2 experts, layer 2 unused
    shares, smallest = expert_shares(counts, [2, 4, 4])
    assert shares[0] == [0.75, 0.25, 0.0, 0.0] and smallest == 0.25
    assert expert_shares(counts)[1] == 0.0  # without widths a padded column counts as an idle expert


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_resume_matches_uninterrupted_run(tiny_run_inputs, tmp_path, signum):
    """Stopping at step 3 by Ctrl-C or SIGTERM and resuming gives the same losses at every step and the same
    weights as one straight run."""
    model_dir, data = tiny_run_inputs
    train(**_opts(model_dir, data, tmp_path / "straight"))

    class InterruptAt3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:  # the signal arrives during the third step
                os.kill(os.getpid(), signum)  # the real path: the handler asks for save + stop

    def unhandled(signo, frame):  # what would happen without training's handler: the process ends
        raise RuntimeError(f"{signum.name} was not handled by train()")

    previous = signal.signal(signum, unhandled)
    try:
        first = train(**_opts(model_dir, data, tmp_path / "resumed"), callbacks=[InterruptAt3()])
    finally:
        assert signal.signal(signum, previous) is unhandled  # training put the handler it found back
    assert first["interrupted"] and first["steps"] == 3 and first["stop_signal"] == signum.name
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    second = train(**_opts(model_dir, data, tmp_path / "resumed", resume=True))
    assert second["steps"] == 6 and not second["interrupted"] and second["stop_signal"] is None
    straight, resumed = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, rel=0, abs=1e-6), step
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_stop_signals_a_repeat_soon_after_is_the_same_request_a_later_one_aborts(monkeypatch):
    """A launcher passing on the scheduler's SIGTERM within REPEAT_WINDOW_S does not abort the save; a SIGTERM
    after the window, or a Ctrl-C at any time, does."""
    import loramix.stopping as stopping
    import loramix.train as t

    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    cb = t.InterruptCallback()
    cb.handle(signal.SIGTERM)
    assert cb.received == signal.SIGTERM and not cb.requested  # requested once the step end saw it
    clock[0] += stopping.REPEAT_WINDOW_S / 2
    cb.handle(signal.SIGTERM)  # the launcher's copy
    with pytest.raises(stopping.StopAborted) as e:
        cb.handle(signal.SIGINT)
    assert e.value.signum == signal.SIGINT and isinstance(e.value, KeyboardInterrupt)
    clock[0] += stopping.REPEAT_WINDOW_S
    with pytest.raises(stopping.StopAborted) as e:
        cb.handle(signal.SIGTERM)
    assert e.value.signum == signal.SIGTERM
    first_int = t.InterruptCallback()
    first_int.handle(signal.SIGINT)
    with pytest.raises(stopping.StopAborted):  # a second Ctrl-C aborts however soon it comes
        first_int.handle(signal.SIGINT)


def test_ranks_agree_on_the_step_they_stop_at(tmp_path):
    """Two gloo processes: the signal reached only process 1. At the step end both see it (InterruptCallback
    then saves and stops on both; without the agreement, process 0 trains on alone and the two hang; the slow
    test_accelerate_sigterm_on_one_process_stops_both_at_the_same_step runs the whole of it)."""
    import torch.multiprocessing as mp

    from helpers.rank_stop import stop_flags_of_two_ranks

    # fork: the children start with the modules this process has loaded (no second import of loramix)
    mp.start_processes(stop_flags_of_two_ranks, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1] == {"before": 0, "after": signal.SIGTERM}, got


def test_divergence_stops_and_keeps_last_good(tiny_run_inputs, tmp_path):
    """A loss above max_loss stops the run with a clear error and keeps the last good adapter."""
    model_dir, data = tiny_run_inputs
    with pytest.raises(TrainingDivergedError, match="max_loss"):
        train(**_opts(model_dir, data, tmp_path / "run", max_loss=1.0))
    assert (tmp_path / "run" / "last_good" / "adapter_model.safetensors").is_file()


def test_options_are_validated_and_yaml_config_works(tiny_run_inputs, tmp_path):
    """Unknown options and bad values fail naming the option; YAML options resolve like flags."""
    model_dir, data = tiny_run_inputs
    with pytest.raises(ConfigError, match="num_expertz"):
        resolve(data=data, num_expertz=3)
    with pytest.raises(ConfigError, match="adapter"):
        resolve(data=data, adapter="qlora")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {data}\nnum_experts: 3\ntop_k: 1\nlearning_rate: 1.0e-3\n")
    t, d, m = resolve(cfg, top_k=2)
    assert (m.num_experts, m.top_k, t.learning_rate, d.data) == (3, 2, 1e-3, data)
    t, d, m = resolve(cfg, adapter="lora")
    assert (m.num_experts, m.router) == (1, "dense")


def test_accelerate_two_cpu_processes_end_with_same_weights(tiny_run_inputs, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) trains and both ranks end with identical weights."""
    model_dir, data = tiny_run_inputs
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    loramix_bin = shutil.which("loramix", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp"
    # accelerate's multi-process (torchrun) launcher; without CUDA, Trainer uses the gloo backend on CPU
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", loramix_bin, "train", "--model", model_dir,
           "--data", data, "--output-dir", str(out), "--max-steps", "4", "--num-experts", "4", "--r", "4",
           "--attn-r", "4", "--batch-size", "2", "--val-size", "0", "--no-plots", "--learning-rate", "5e-3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = sorted((out / "rank_digests").glob("rank*.txt"))
    assert len(digests) == 2
    assert digests[0].read_text() == digests[1].read_text()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_gradient_checkpointing_trains_routers(tiny_run_inputs, tmp_path):
    """With (non-reentrant) gradient checkpointing the routers still learn from the LM + aux loss."""
    from safetensors.torch import load_file as load

    model_dir, data = tiny_run_inputs
    train(**_opts(model_dir, data, tmp_path / "gc", max_steps=3, gradient_checkpointing=True))
    weights = load(tmp_path / "gc" / "adapter" / "adapter_model.safetensors")
    routers = {k: v for k, v in weights.items() if "mixlora_router" in k}
    assert routers
    rows = [json.loads(x) for x in (tmp_path / "gc" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in rows if "loss" in r)
    grad_norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
    assert len(grad_norms) == 3 and all(g > 0 for g in grad_norms)


def test_balance_counts_are_applied_at_every_step_end(tiny_run_inputs, tmp_path):
    """The saved adapter holds the updated balance biases and no rank-local pending counts: the counts of
    the last forward are applied when its optimizer step ends (2-process ranks then agree, see the
    accelerate test)."""
    model_dir, data = tiny_run_inputs
    train(**_opts(model_dir, data, tmp_path / "run", max_steps=3))
    weights = _weights(tmp_path / "run")
    pending = [t for n, t in weights.items() if n.endswith("balance_pending")]
    biases = [t for n, t in weights.items() if n.endswith("balance_bias")]
    assert pending and len(pending) == len(biases)
    assert all(not t.any() for t in pending)
    assert any(t.any() for t in biases)


# --- lost work: output directory, atomic checkpoints, resume ----------------------------------------------
def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _fake_finished_run(run: Path) -> dict[str, bytes]:
    """The files a finished run leaves (contents do not matter: they must come through untouched)."""
    for name, text in {"adapter/adapter_config.json": "{}", "adapter/adapter_model.safetensors": "old weights",
                       "checkpoint-9/trainer_state.json": "{}", "metrics.jsonl": '{"step": 9, "loss": 1.0}\n',
                       "resolved_config.yaml": "train: {}\n", "summary.json": "{}"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    return _snapshot(run)


def test_a_non_empty_output_dir_is_refused_and_left_untouched(tiny_run_inputs, tmp_path):
    """Training into a directory holding a run, without resume or overwrite, fails before writing anything
    and says how to continue or replace it."""
    model_dir, data = tiny_run_inputs
    run = tmp_path / "run"
    before = _fake_finished_run(run)
    with pytest.raises(ConfigError, match=r"output_dir: .*run is not empty.*--resume true.*--overwrite"):
        train(**_opts(model_dir, data, run))
    assert _snapshot(run) == before


def test_overwrite_puts_the_previous_run_back_when_the_new_run_fails_before_saving(tiny_run_inputs, tmp_path):
    """With overwrite, a run that fails before its first checkpoint deletes nothing of the previous run."""
    model_dir, data = tiny_run_inputs
    run = tmp_path / "run"
    before = _fake_finished_run(run)

    class FailAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise RuntimeError("failed right after set-up")

    with pytest.raises(RuntimeError, match="right after set-up"):
        train(**_opts(model_dir, data, run, overwrite=True), callbacks=[FailAtStart()])
    assert _snapshot(run) == before  # adapter, metrics and resolved_config as they were; nothing new
    assert sorted(p.name for p in run.iterdir()) == sorted({k.split("/")[0] for k in before})


def test_a_new_run_that_fails_before_training_leaves_nothing_behind(tiny_run_inputs, tmp_path):
    """A run into a new (nested) output directory that fails before training starts (here: after the model
    loaded, asking for more validation rows than the data has) removes what it wrote and the directories it
    made; an empty directory that was there stays, empty."""
    model_dir, data = tiny_run_inputs
    with pytest.raises(ConfigError, match="val_size"):
        train(**_opts(model_dir, data, tmp_path / "a" / "b" / "run", val_size=1000))
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="val_size"):
        train(**_opts(model_dir, data, tmp_path / "empty", val_size=1000))
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_a_run_that_fails_after_training_started_keeps_its_files(tiny_run_inputs, tmp_path):
    """Once training started, a failed run keeps what it wrote (its resolved config and metrics show what ran)."""
    model_dir, data = tiny_run_inputs

    class FailAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise RuntimeError("failed right after set-up")

    with pytest.raises(RuntimeError, match="right after set-up"):
        train(**_opts(model_dir, data, tmp_path / "run"), callbacks=[FailAtStart()])
    assert (tmp_path / "run" / "resolved_config.yaml").is_file()


def test_the_data_is_checked_before_the_model_loads(tiny_run_inputs, tmp_path, monkeypatch):
    """An unreachable hub data set or a missing data file fails before the base model is loaded (here a model
    that does not exist: its error would come first otherwise), and leaves no output directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing_model = str(tmp_path / "no-model")
    with pytest.raises(Exception, match="no-such-user/no-such-data") as e:
        train(**_opts(missing_model, "no-such-user/no-such-data", tmp_path / "runs" / "hub"))
    assert "no-model" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train(**_opts(missing_model, str(tmp_path / "missing.jsonl"), tmp_path / "runs" / "file"))
    assert not (tmp_path / "runs").exists()


def test_overwrite_replaces_the_previous_run_entirely(tiny_run_inputs, tmp_path):
    """A successful overwrite leaves only the new run: no old checkpoint beside the new ones, new metrics."""
    model_dir, data = tiny_run_inputs
    run = tmp_path / "run"
    _fake_finished_run(run)
    s = train(**_opts(model_dir, data, run, max_steps=2, eval_steps=2, overwrite=True))
    assert s["steps"] == 2
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run / ".replaced-run").exists()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() != b"old weights"


def test_a_checkpoint_appears_only_when_complete(tiny_run_inputs, tmp_path, monkeypatch):
    """A save that fails half-way (here: after the adapter and optimizer are written) leaves no
    checkpoint-N directory, only the hidden staging directory."""
    from transformers import Trainer

    model_dir, data = tiny_run_inputs

    def fail(self, output_dir):
        raise OSError("disk full")

    monkeypatch.setattr(Trainer, "_save_rng_state", fail)
    with pytest.raises(OSError, match="disk full"):
        train(**_opts(model_dir, data, tmp_path / "run", max_steps=3, eval_steps=3))
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    staged = tmp_path / "run" / ".tmp-checkpoint-3" / "checkpoint-3"
    assert (staged / "adapter_model.safetensors").is_file() and not (staged / "trainer_state.json").exists()


def test_resume_skips_an_incomplete_newest_checkpoint(tiny_run_inputs, tmp_path, caplog):
    """A damaged newest checkpoint (here one written in place by a killed save) is skipped with a warning
    naming it and the missing file; the run resumes from the last complete one and ends as a straight run."""
    model_dir, data = tiny_run_inputs
    run = tmp_path / "run"

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    train(**_opts(model_dir, data, run), callbacks=[StopAt3()])
    before = _snapshot(run)

    class FailAtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise RuntimeError("failed right after set-up")

    with pytest.raises(RuntimeError, match="right after set-up"):  # a resume that fails changes no file
        train(**_opts(model_dir, data, run, resume=True, learning_rate=1e-3), callbacks=[FailAtStart()])
    assert _snapshot(run) == before
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-5")
    (run / "checkpoint-5" / "trainer_state.json").unlink()
    with pytest.raises(ConfigError, match=r"resume: cannot resume from .*checkpoint-5.*trainer_state\.json is missing"):
        train(**_opts(model_dir, data, run, resume=str(run / "checkpoint-5")))
    with caplog.at_level("WARNING", logger="loramix.train"):
        s = train(**_opts(model_dir, data, run, resume=True))
    assert s["resumed_from"] == str(run / "checkpoint-3") and s["steps"] == 6
    assert "checkpoint-5" in caplog.text and "trainer_state.json is missing" in caplog.text


def test_resuming_a_finished_run_trains_no_step_past_max_steps(tiny_run_inputs, tmp_path, caplog):
    """`--resume true` on a run whose last checkpoint is at --max-steps (a requeued job that had finished, the
    SLURM script of docs/training.md run again) trains nothing: the run stays at max_steps, no checkpoint is
    added, and the adapter is the one the run ended with (the best checkpoint's, with validation)."""
    model_dir, data = tiny_run_inputs
    run = tmp_path / "run"
    first = train(**_opts(model_dir, data, run, max_steps=4, eval_steps=2, val_size=4))
    adapter = _weights(run)
    with caplog.at_level("WARNING", logger="loramix.train"):
        again = train(**_opts(model_dir, data, run, max_steps=4, eval_steps=2, val_size=4, resume=True))
    assert again["steps"] == first["steps"] == 4 and again["resumed_from"] == str(run / "checkpoint-4")
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert again["final_val_loss"] == pytest.approx(first["final_val_loss"], abs=1e-6)
    assert all(torch.equal(adapter[k], v) for k, v in _weights(run).items())
    assert "nothing left to train" in caplog.text
    assert again["already_finished"] and not first["already_finished"]
    assert summary_text(again).startswith("Nothing left to train: the run was already at step 4")
    assert summary_text(first).startswith("Trained 4 steps")
    more = train(**_opts(model_dir, data, run, max_steps=5, eval_steps=2, val_size=4, resume=True))
    assert more["steps"] == 5 and not more["already_finished"]  # a higher --max-steps trains on


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", "four", r"TrainConfig\.batch_size: must be an int >= 1, got 'four'"),
    ("max_steps", "abc", r"TrainConfig\.max_steps: must be an int, got 'abc'"),
    ("learning_rate", "fast", r"TrainConfig\.learning_rate: must be a number, got 'fast'"),
    ("router_lr", "fast", r"TrainConfig\.router_lr: must be a number or None, got 'fast'"),
    ("save_total_limit", 0, r"TrainConfig\.save_total_limit: must be an int >= 1"),
    ("warmup_ratio", 1.5, r"TrainConfig\.warmup_ratio: must be a number in \[0.0, 1.0\)"),
    ("max_loss", 0, r"TrainConfig\.max_loss: must be a number > 0"),
    ("plots", "yes", r"TrainConfig\.plots: must be true or false"),
    ("lr_scheduler", "cosin", r"TrainConfig\.lr_scheduler: must be one of"),
    ("resume", 3, r"TrainConfig\.resume: must be true, false or a checkpoint path"),
])
def test_train_options_are_type_checked(tiny_run_inputs, field, value, match):
    """Wrong types and out-of-range values name the field (no TypeError from a comparison)."""
    _, data = tiny_run_inputs
    with pytest.raises(ConfigError, match=match):
        resolve(data=data, **{field: value})


def test_yaml_syntax_error_in_the_options_file_names_file_and_line(tmp_path):
    from loramix.train import load_options_file

    path = tmp_path / "opts.yaml"
    path.write_text("data: x.jsonl\nnum_experts: [4\nr: 8\n")
    with pytest.raises(ConfigError, match=r"opts\.yaml: not valid YAML: line \d+ column \d+"):
        load_options_file(path)
