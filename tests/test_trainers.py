"""The trainers users already run, unchanged, on a loramix model: HF Trainer with bf16/fp16 mixed precision,
Accelerate with mixed_precision="bf16", and TRL's SFTTrainer with its default config (gradient checkpointing on).

Each must really run under autocast (checked inside the forward), train (loss falls) and optimise a loss that
includes the router aux loss.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import loramix
from helpers.tiny_lm import byte_tokenizer
from helpers.tiny_models import tiny_config
from loramix import MixLoraConfig

DEVICE = os.environ.get("LORAMIX_TEST_DEVICE", "cpu")  # bench/gpu_check.sh runs this file with "cuda"
CONFIG = dict(num_experts=4, top_k=2, r=4, alpha=8, attn_r=4, attn_alpha=8, dropout=0.0, attn_dropout=0.0,
              balance_coef=0.05)


def tiny_causal_lm(tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", vocab_size=len(tokenizer))
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def autocast_recorder(model) -> list[tuple[bool, torch.dtype]]:
    """Record, on every forward of the first MoE layer, whether autocast was on and its dtype (the trainers
    wrap ``model.forward`` itself, so a hook on the model would run outside their autocast)."""
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(module, args):  # noqa: ANN001
        seen.append((torch.is_autocast_enabled(DEVICE), torch.get_autocast_dtype(DEVICE)))

    next(iter(loramix.injection.get_state(model).moe_layers.values())).register_forward_pre_hook(hook)
    return seen


def assert_loss_includes_aux(model, batch: dict[str, torch.Tensor]) -> None:
    """model(**batch).loss == cross-entropy of its logits + its aux loss, with the aux loss > 0."""
    model.eval()
    with torch.no_grad():
        out = model(**{k: v.to(model.device) for k, v in batch.items()})
    batch = {k: v.to(model.device) for k, v in batch.items()}
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert float(out.aux_loss) > 0
    torch.testing.assert_close(out.loss.float(), lm + out.aux_loss.float(), rtol=1e-4, atol=1e-5)


def lm_dataset(tokenizer, rows: int = 32) -> list[dict[str, torch.Tensor]]:
    """Padded rows as a plain list (no ``datasets``: the GPU check machine has only torch and the HF core)."""
    texts = [f"question {i}: how do I cope with stress? answer: breathe and rest {i % 5}." for i in range(rows)]
    enc = tokenizer(texts, max_length=32, truncation=True, padding="max_length", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return [{"input_ids": ids, "attention_mask": mask, "labels": lab}
            for ids, mask, lab in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)]


def stack(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class LossLog:
    """A TrainerCallback that keeps every logged training loss."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Log(TrainerCallback):
            def __init__(self) -> None:
                self.losses: list[float] = []

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                if logs and "loss" in logs:
                    self.losses.append(logs["loss"])

        return _Log()


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_hf_trainer_mixed_precision(flag, tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    if flag == "fp16" and DEVICE == "cpu":
        pytest.skip("accelerate turns fp16 mixed precision off on CPU (no autocast, no scaler); "
                    "test_fp16_autocast_with_grad_scaler runs the same recipe by hand, bench/gpu_check.sh on CUDA")

    tok = byte_tokenizer()
    model = loramix.inject(tiny_causal_lm(tok), MixLoraConfig(**CONFIG)).train()
    seen = autocast_recorder(model)
    log = LossLog()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, use_cpu=DEVICE == "cpu", report_to="none",
                             save_strategy="no", disable_tqdm=True, **{flag: True})
    data = lm_dataset(tok)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[log]).train()
    assert seen and all(on and dtype == getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[flag])
                        for on, dtype in seen), seen[:3]
    assert all(map(lambda x: x == x, log.losses)) and log.losses[-1] < log.losses[0], log.losses
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert_loss_includes_aux(model, stack(data[:4]))


def test_fp16_autocast_with_grad_scaler() -> None:
    """What HF Trainer and Accelerate do with fp16=True on a GPU: fp32 weights, fp16 autocast, a GradScaler."""
    tok = byte_tokenizer()
    model = loramix.inject(tiny_causal_lm(tok), MixLoraConfig(**CONFIG)).to(DEVICE).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12)
    batch = {k: v.to(DEVICE) for k, v in stack(lm_dataset(tok)[:8]).items()}
    losses = []
    for _ in range(12):
        with torch.autocast(DEVICE, dtype=torch.float16):
            out = model(**batch)
        assert out.logits.dtype == torch.float16
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert scaler.get_scale() >= 2.0**11  # no run of overflowing steps: gradients stayed finite in fp16
    assert losses[-1] < losses[0], losses
    assert_loss_includes_aux(model, {k: v[:4] for k, v in batch.items()})


def test_accelerate_bf16_loop() -> None:
    from accelerate import Accelerator

    tok = byte_tokenizer()
    model = loramix.inject(tiny_causal_lm(tok), MixLoraConfig(**CONFIG)).train()
    seen = autocast_recorder(model)
    accelerator = Accelerator(mixed_precision="bf16", cpu=DEVICE == "cpu")
    loader = torch.utils.data.DataLoader(lm_dataset(tok), batch_size=8, shuffle=False, collate_fn=stack)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for _ in range(3):
        for batch in loader:
            out = model(**batch)
            accelerator.backward(out.loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(out.loss.detach()))
    assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)
    assert losses[-1] < losses[0], losses
    batch = {k: v[:4] for k, v in next(iter(loader)).items()}
    assert_loss_includes_aux(accelerator.unwrap_model(model), batch)


def test_trl_sft_trainer_default_config(tmp_path) -> None:
    trl = pytest.importorskip("trl", reason="trl is a test dependency: pip install -e '.[dev]'")
    from datasets import Dataset

    tok = byte_tokenizer()
    model = loramix.inject(tiny_causal_lm(tok), MixLoraConfig(**CONFIG)).train()
    seen = autocast_recorder(model)
    log = LossLog()
    rows = [{"prompt": f"question {i}: how do I cope with stress?", "completion": f" breathe and rest {i % 5}."}
            for i in range(32)]
    defaults = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=DEVICE == "cpu")
    assert defaults.gradient_checkpointing  # what the test is about: TRL's default turns it on
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
                        logging_steps=1, use_cpu=DEVICE == "cpu", report_to="none", save_strategy="no",
                        disable_tqdm=True, max_length=64)
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             callbacks=[log])
    trainer.train()
    assert trainer.args.gradient_checkpointing and model.is_gradient_checkpointing
    if defaults.bf16:  # TRL's default mixed precision, when it sets one, must really be in effect
        assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)
    assert log.losses[-1] < log.losses[0], log.losses
    routers = [p for n, p in model.named_parameters() if "mixlora_router" in n]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in routers)
    assert_loss_includes_aux(model, stack(lm_dataset(tok)[:4]))


def test_precision_auto_picks_what_the_device_supports(monkeypatch) -> None:
    from loramix.train import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # T4 / V100
    assert resolve_precision("auto") == "fp16"
    assert resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_loramix_train_runs_in_the_chosen_precision(precision, tmp_path) -> None:
    import json

    from safetensors.torch import load_file

    from helpers.tiny_lm import save_tiny_lm
    from loramix.train import resolve_precision, train

    model_dir = save_tiny_lm(tmp_path / "model")
    rows = [{"prompt": f"question {i}: how do I cope?", "response": f"breathe and rest {i % 5}."} for i in range(32)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    summary = train(model=model_dir, data=str(data), output_dir=str(tmp_path / "run"), max_steps=4, eval_steps=4,
                    num_experts=4, top_k=2, r=4, attn_r=4, learning_rate=5e-3, batch_size=4, val_size=8,
                    plots=False, precision=precision)
    assert summary["precision"] == resolve_precision(precision)
    assert summary["final_val_loss"] < summary["base_val_loss"]
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


def test_evaluation_keeps_no_logits(tmp_path) -> None:
    """loramix's Trainer evaluates the loss only: gathering every validation row's (length, vocab) logits cost
    gigabytes with a 49k vocabulary."""
    from loramix.train import LoramixTrainer, TrainConfig, _training_args

    tok = byte_tokenizer()
    model = loramix.inject(tiny_causal_lm(tok), MixLoraConfig(**CONFIG))
    args = _training_args(TrainConfig(output_dir=str(tmp_path), max_steps=1), has_val=True)
    trainer = LoramixTrainer(model=model, args=args, eval_dataset=lm_dataset(tok, rows=8))
    out = trainer.evaluation_loop(trainer.get_eval_dataloader(), "eval")
    assert out.predictions is None and out.metrics["eval_loss"] > 0
