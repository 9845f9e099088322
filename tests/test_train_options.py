"""Training options on tiny local models: the router learning rate, the warmup + cosine schedule, the NaN guard's
last good adapter, the best-model reload by validation LM loss, and resuming with another config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from helpers.tiny_lm import save_tiny_lm
from helpers.tiny_models import tiny_model
from loramix import MixLoraConfig, inject
from loramix.checkpoint import AdapterLoadError, trainable_state_dict
from loramix.config import ConfigError
from loramix.train import LoramixTrainer, TrainConfig, TrainingDivergedError, train

ROWS = [{"Context": f"question {i}: how do I cope with stress at work?",
         "Response": f"answer {i}: breathe, rest and talk to someone you trust."} for i in range(48)]
LR = 5e-3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_options")
    model_dir = save_tiny_lm(d / "model")
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    return model_dir, str(data)


def _opts(inputs, out: Path, **kw):
    model_dir, data = inputs
    opts = dict(model=model_dir, data=data, output_dir=str(out), max_steps=6, eval_steps=3, num_experts=4,
                top_k=2, r=4, attn_r=4, learning_rate=LR, batch_size=4, val_size=0, plots=False, seed=1)
    opts.update(kw)
    return opts


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in trainable_state_dict(model).items()}


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The documented schedule: linear warmup from 0 over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


class Recorder(TrainerCallback):
    """The learning rate of each optimizer group used by every update, and the adapter tensors after it."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.weights[state.global_step] = snapshot(model)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):  # noqa: ANN001
        self.lrs.append([group["lr"] for group in optimizer.param_groups])  # the lr this step's update uses

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.weights[state.global_step] = snapshot(model)


# --- router_lr and the schedule --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frozen_router_run(inputs, tmp_path_factory):
    """8 steps, warmup_ratio 0.25 (ceil(0.25 * 8) = 2 warmup steps), router_lr 0."""
    recorder = Recorder()
    train(**_opts(inputs, tmp_path_factory.mktemp("frozen") / "run", max_steps=8, warmup_ratio=0.25, router_lr=0.0),
          callbacks=[recorder])
    return recorder


def test_router_lr_zero_keeps_the_router_weights_frozen(frozen_router_run: Recorder) -> None:
    first, last = frozen_router_run.weights[0], frozen_router_run.weights[8]
    routers = [n for n in first if "mixlora_router" in n and n.endswith("weight")]
    assert len(routers) == 2
    for name in routers:
        assert torch.equal(first[name], last[name]), f"{name} moved with router_lr=0"
    experts = [n for n in first if "mixlora_experts" in n and "lora_B" in n]
    assert experts and all(not torch.equal(first[n], last[n]) for n in experts)  # everything else trains
    assert all(lrs[1] == 0.0 for lrs in frozen_router_run.lrs)
    biases = [n for n in first if n.endswith("balance_bias")]  # a buffer with its own rate: it still moves
    assert biases and any(not torch.equal(first[n], last[n]) for n in biases)


def test_warmup_then_cosine_follow_the_documented_curve(frozen_router_run: Recorder) -> None:
    lrs = [group[0] for group in frozen_router_run.lrs]
    assert len(lrs) == 8
    want = [LR * cosine_with_warmup(s, warmup=2, total=8) for s in range(8)]  # 0, LR/2, LR, then cosine
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert want[2] == LR and want[1] == LR / 2 and want[5] == pytest.approx(LR / 2)


@pytest.mark.parametrize(("router_lr", "want"), [(None, 1e-3), (2.5e-4, 2.5e-4), (0.0, 0.0)])
def test_router_group_gets_router_lr_and_follows_the_same_schedule(tmp_path, router_lr, want) -> None:
    model = inject(tiny_model("llama"), MixLoraConfig(num_experts=4, r=4, attn_r=4, router="noisy_topk"))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, warmup_steps=2, max_steps=8,
                             lr_scheduler_type="cosine", report_to="none", use_cpu=True)
    trainer = LoramixTrainer(model=model, args=args, router_lr=router_lr)
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    other, router = trainer.optimizer.param_groups
    router_params = {id(p) for n, p in model.named_parameters() if "mixlora_router" in n}
    assert {id(p) for p in router["params"]} == router_params and len(router_params) == 4  # weight + noise, 2 layers
    assert not {id(p) for p in other["params"]} & router_params
    for step in range(8):
        factor = cosine_with_warmup(step, warmup=2, total=8)
        assert other["lr"] == pytest.approx(1e-3 * factor, abs=1e-15)
        assert router["lr"] == pytest.approx(want * factor, abs=1e-15)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()


def test_router_lr_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="router_lr"):
        TrainConfig(router_lr=-1e-4)
    assert TrainConfig(router_lr=0.0).router_lr == 0.0


# --- NaN guard ------------------------------------------------------------------------------------------
class NaNAtStep(Recorder):
    """Makes the LM head return NaN during update number ``step`` (weights untouched: only the loss is NaN)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.poison = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        super().on_train_begin(args, state, control, model=model, **kwargs)
        model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if self.poison else out)

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        super().on_step_begin(args, state, control, **kwargs)
        self.poison = state.global_step + 1 == self.step


def test_nan_loss_stops_and_last_good_holds_the_last_finite_step(inputs, tmp_path) -> None:
    nan = NaNAtStep(4)
    with pytest.raises(TrainingDivergedError, match="step 4 is not finite"):
        train(**_opts(inputs, tmp_path / "run", max_steps=6), callbacks=[nan])
    assert max(nan.weights) == 3  # no update after the NaN loss
    last_good = load_file(tmp_path / "run" / "last_good" / "adapter_model.safetensors")
    after_3, after_2 = nan.weights[3], nan.weights[2]
    params = [n for n in after_3 if "lora_" in n and not n.endswith(("balance_bias", "balance_pending"))]
    assert params and last_good.keys() == after_3.keys()
    for name in [*params, *(n for n in after_3 if n.endswith("balance_bias"))]:
        assert torch.equal(last_good[name], after_3[name]), name
    # the diverged forward counted its assignments before its loss was checked; last_good drops them
    pending = [n for n in last_good if n.endswith("balance_pending")]
    assert pending and all(not last_good[n].any() for n in pending)
    assert any(not torch.equal(after_3[n], after_2[n]) for n in params)  # step 3 did change the weights
    assert all(torch.isfinite(t).all() for t in last_good.values())
    assert not (tmp_path / "run" / "adapter").exists()


class NaNGradAtStep(NaNAtStep):
    """Makes one adapter weight's gradient NaN during update number ``step``; the loss stays finite."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        Recorder.on_train_begin(self, args, state, control, model=model, **kwargs)
        weight = next(p for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad)
        weight.register_hook(lambda g: g * float("nan") if self.poison else g)


def test_non_finite_gradients_of_a_finite_loss_stop_before_the_update(inputs, tmp_path) -> None:
    nan = NaNGradAtStep(4)
    with pytest.raises(TrainingDivergedError, match="gradient norm nan at step 4 is not finite"):
        train(**_opts(inputs, tmp_path / "run", max_steps=6), callbacks=[nan])
    assert max(nan.weights) == 3  # the NaN gradients were never applied
    last_good = load_file(tmp_path / "run" / "last_good" / "adapter_model.safetensors")
    params = [n for n in nan.weights[3] if "lora_" in n and not n.endswith(("balance_bias", "balance_pending"))]
    assert params and all(torch.equal(last_good[n], nan.weights[3][n]) for n in params)
    assert all(torch.isfinite(t).all() for t in last_good.values())


# --- best-model reload ----------------------------------------------------------------------------------
class ScrambleAndCheckEval(TrainerCallback):
    """After update ``step`` the LoRA B weights get large random values, so later validation is worse. At every
    evaluation, the LM loss over the validation batches is computed from the logits here and compared with
    the reported eval loss; the aux loss in those forwards is recorded."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.checked: list[tuple[float, float, float]] = []  # (reported, LM loss from logits, aux loss)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if state.global_step == self.step:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn(p.shape, generator=g) * 2.0)

    def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None, **kwargs):  # noqa: ANN001
        reported = next(v for k, v in metrics.items() if k.endswith("_loss"))
        total, count, aux = 0.0, 0, 0.0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in eval_dataloader:
                out = model(**batch)
                logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100)
                total += float(loss) * labels.shape[0]  # Trainer averages the per-batch means over examples
                count += labels.shape[0]
                aux = float(out.aux_loss)
        model.train(was_training)
        self.checked.append((reported, total / count, aux))


def test_best_model_reload_picks_the_lowest_validation_lm_loss(inputs, tmp_path) -> None:
    """Validation at steps 2, 4, 6; the weights are scrambled after step 3, so step 2 is the best. The final
    adapter is checkpoint-2's, and every reported validation loss is the LM loss without the (large) aux loss."""
    check = ScrambleAndCheckEval(step=3)
    summary = train(**_opts(inputs, tmp_path / "run", max_steps=6, eval_steps=2, val_size=8, balance_coef=1.0),
                    callbacks=[check])
    assert len(check.checked) >= 4  # base + steps 2, 4, 6 (+ the final evaluation)
    for reported, lm, aux in check.checked:
        assert aux > 1.0  # balance_coef 1: the aux loss would change the ordering if it were included
        assert reported == pytest.approx(lm, rel=1e-5)
    history = json.loads((tmp_path / "run" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    evals = {row["step"]: row["eval_loss"] for row in history if "eval_loss" in row}
    assert sorted(evals) == [2, 4, 6] and min(evals, key=evals.get) == 2
    assert Path(summary["best_checkpoint"]).name == "checkpoint-2"
    final = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    best = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert any(not torch.equal(final[k], last[k]) for k in last)
    assert summary["final_val_loss"] == pytest.approx(evals[2], rel=1e-6)


# --- resume ---------------------------------------------------------------------------------------------
def test_resume_with_another_config_is_refused_naming_the_field(inputs, tmp_path) -> None:
    train(**_opts(inputs, tmp_path / "run", max_steps=2, eval_steps=2))
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    with pytest.raises(AdapterLoadError, match=r"top_k \(checkpoint 2, model 1\)"):
        train(**_opts(inputs, tmp_path / "run", max_steps=4, eval_steps=2, top_k=1, resume=True))
