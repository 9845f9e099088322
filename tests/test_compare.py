"""compare.py: equal-budget training of LoRA and MixLoRA, evaluation of all runs, table and plots."""

from __future__ import annotations

import json

import pytest
import torch

from helpers.tiny_models import tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from loramix.compare import compare, comparison_table

ARC = (
    "Please choose the correct answer to the question: which is a cat ?\n\nAnswer1: a dog . Answer2: a cat ."
    "\n\nAnswer format: answer1/answer2"
)


@pytest.fixture()
def setup(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data_root = tmp_path / "data"
    task = data_root / "llm_adapters_commonsense" / "ARC-Easy"
    task.mkdir(parents=True)
    recs = [{"instruction": ARC, "input": "", "output": "the correct answer is answer2", "answer": "answer2"}] * 4
    (task / "test.json").write_text(json.dumps(recs))
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in recs * 4))
    return model_dir, data_root, train_file


def test_compare_with_the_real_trainer(setup, tmp_path):
    model_dir, data_root, train_file = setup
    res = compare(
        str(train_file),
        model=str(model_dir),
        tasks=["ARC-Easy"],
        output_dir=tmp_path / "cmp",
        max_steps=2,
        data_dir=data_root,
        device="cpu",
        batch_size=2,
        val_size=0,
        num_experts=2,
        top_k=1,
        r=2,
        attn_r=2,
        max_length=64,
    )
    assert set(res["runs"]) == {"base", "lora", "mixlora"}
    for name in ("lora", "mixlora"):
        assert res["runs"][name]["train"]["steps"] == 2
        assert res["runs"][name]["eval"]["tasks"]["ARC-Easy"]["n"] == 4
    assert res["runs"]["base"]["train"] is None
    lora_p = res["runs"]["lora"]["train"]["trainable_params"]
    mix_p = res["runs"]["mixlora"]["train"]["trainable_params"]
    assert mix_p > lora_p  # 2 experts + router vs one LoRA
    for key in ("json", "markdown", "metrics_png", "loss_png"):
        assert (tmp_path / "cmp" / res["files"][key].split("/")[-1]).is_file(), key
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["max_steps"] == 2
    assert "| ARC-Easy | acc | 4 |" in res["table"]


def test_compare_passes_the_same_options_to_every_run(tmp_path):
    calls = []

    def fake_train(**kw):
        calls.append(kw)
        return {
            "adapter_dir": f"/ad/{kw['adapter']}",
            "steps": kw["max_steps"],
            "train_seconds": 1.5,
            "trainable_params": 10 if kw["adapter"] == "lora" else 80,
            "final_val_loss": 0.25,
        }

    loads = []

    def fake_load(model, adapter_dir, device=None):
        loads.append(adapter_dir)
        m = tiny_model("llama")
        if adapter_dir == "/ad/mixlora":  # make the "trained" model prefer answer2
            m.lm_head.register_forward_hook(
                lambda mod, a, out: (
                    out + 30.0 * (torch.arange(out.shape[-1]) == tiny_tokenizer().convert_tokens_to_ids("answer2"))
                )
            )
        return m, tiny_tokenizer()

    data_root = tmp_path / "data" / "llm_adapters_commonsense" / "ARC-Easy"
    data_root.mkdir(parents=True)
    (data_root / "test.json").write_text(json.dumps([{"instruction": ARC, "answer": "answer2"}] * 3))
    res = compare(
        "train.json",
        model="m",
        tasks=["ARC-Easy"],
        output_dir=tmp_path / "cmp",
        max_steps=7,
        data_dir=tmp_path / "data",
        train_fn=fake_train,
        load_fn=fake_load,
        learning_rate=1e-3,
        plots=False,
    )
    assert [c["adapter"] for c in calls] == ["lora", "mixlora"]
    for c in calls:
        assert c["max_steps"] == 7 and c["learning_rate"] == 1e-3 and c["data"] == "train.json" and c["model"] == "m"
    assert loads == [None, "/ad/lora", "/ad/mixlora"]
    assert res["runs"]["mixlora"]["eval"]["tasks"]["ARC-Easy"]["acc"] == 1.0
    table = comparison_table(res["runs"])
    assert "| mixlora | 7 | 1.5 | 80 | 0.25 |" in table and "| base | - |" in table


def test_matched_lora_rank_has_the_mixlora_parameter_count(setup):
    """The 'match' rank gives a LoRA whose trainable count is the closest to MixLoRA's of all ranks."""
    from loramix.compare import count_trainable, matched_lora_rank
    from loramix.config import MixLoraConfig

    model_dir = str(setup[0])
    options = {"num_experts": 4, "top_k": 2, "r": 4, "attn_r": 4, "learning_rate": 1e-3}
    m = matched_lora_rank(model_dir, options)
    base = tiny_model("llama")
    assert m["mixlora_params"] == count_trainable(base, MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4))

    def lora(rank: int) -> int:
        return count_trainable(base, MixLoraConfig(num_experts=1, router="dense", r=rank, attn_r=rank))

    assert m["lora_params"] == lora(m["rank"])
    gaps = {k: abs(lora(k) - m["mixlora_params"]) for k in range(1, 4 * m["rank"])}
    assert min(gaps, key=gaps.get) == m["rank"] and m["rank"] > 4


def test_lora_rank_option_reaches_only_the_lora_run(tmp_path):
    calls = []

    def fake_train(**kw):
        calls.append(kw)
        return {"adapter_dir": None, "steps": 1}

    with pytest.raises(ValueError, match="lora_rank"):
        compare("d", tasks=[], output_dir=tmp_path, train_fn=fake_train, load_fn=None, lora_rank=0)
    compare("d", tasks=[], output_dir=tmp_path, data_dir=tmp_path, include_base=False, plots=False, train_fn=fake_train,
            load_fn=lambda *a, **k: (None, None), lora_rank=12, r=4, alpha=8, attn_r=2, attn_alpha=4)
    lora, mix = calls
    assert (lora["r"], lora["alpha"], lora["attn_r"], lora["attn_alpha"]) == (12, 24, 12, 24)
    assert (mix["r"], mix["alpha"], mix["attn_r"], mix["attn_alpha"]) == (4, 8, 2, 4)


def test_a_run_stopped_by_a_signal_stops_the_comparison(tmp_path):
    """A training run stopped by SIGTERM (or Ctrl-C) ends the comparison there: no evaluation of the half-trained
    adapter, no further run, no table; the CLI exits 143 (130)."""
    from loramix.stopping import StopAborted

    calls = []

    def fake_train(**kw):
        calls.append(kw["adapter"])
        return {"adapter_dir": None, "steps": 1, "interrupted": True, "stop_signal": "SIGTERM"}

    def no_load(*args, **kwargs):
        raise AssertionError("the interrupted run's adapter was evaluated")

    with pytest.raises(StopAborted) as e:
        compare("d", tasks=[], output_dir=tmp_path, include_base=False, plots=False, train_fn=fake_train,
                load_fn=no_load)
    assert e.value.signum == 15 and len(calls) == 1 and not (tmp_path / "compare.json").exists()


def test_compare_command_takes_data_and_options_from_the_config(tmp_path, monkeypatch):
    import loramix.compare
    from loramix.cli.commands import compare_command
    from loramix.config import ConfigError

    seen = {}
    monkeypatch.setattr(loramix.compare, "compare", lambda data, **kw: seen.update(data=data, **kw) or {})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: a.json,b.json\nnum_experts: 4\nmax_steps: 999\noutput_dir: elsewhere\n")
    compare_command(config=str(cfg), lora_rank="match", max_steps=7)
    assert seen["data"] == "a.json,b.json" and seen["num_experts"] == 4 and seen["lora_rank"] == "match"
    assert seen["max_steps"] == 7 and seen["output_dir"] == "runs/compare"
    compare_command(data="c.json", config=str(cfg), lora_rank="12")
    assert seen["data"] == "c.json" and seen["lora_rank"] == 12
    cfg.write_text("num_experts: 4\n")
    with pytest.raises(ConfigError, match="no training data"):
        compare_command(config=str(cfg))
