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
from datasets import Dataset

import loramix
from loramix import MixLoraConfig
from tiny_lm import byte_tokenizer
from tiny_models import tiny_config

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


def lm_dataset(tokenizer, rows: int = 32) -> Dataset:
    texts = [f"question {i}: how do I cope with stress? answer: breathe and rest {i % 5}." for i in range(rows)]
    enc = tokenizer(texts, max_length=32, truncation=True, padding="max_length")
    labels = [[t if m else -100 for t, m in zip(ids, mask, strict=True)]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                              "labels": labels})


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
    assert_loss_includes_aux(model, data[:4] | {k: torch.tensor(v) for k, v in data[:4].items()})


def test_fp16_autocast_with_grad_scaler() -> None:
    """What HF Trainer and Accelerate do with fp16=True on a GPU: fp32 weights, fp16 autocast, a GradScaler."""
    tok = byte_tokenizer()
    model = loramix.inject(tiny_causal_lm(tok), MixLoraConfig(**CONFIG)).to(DEVICE).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**12)
    data = lm_dataset(tok)[:8]
    batch = {k: torch.tensor(v, device=DEVICE) for k, v in data.items()}
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
    data = lm_dataset(tok).with_format("torch")
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
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
    data = lm_dataset(tok)[:4]
    assert_loss_includes_aux(model, {k: torch.tensor(v) for k, v in data.items()})
