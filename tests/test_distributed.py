"""Two processes on CPU (gloo) with one expert that receives no token on one rank: no hang, equal weights.

MoE adapters hang under FSDP / ZeRO-3 when one rank's backward skips an expert's parameters (accelerate#2662).
Here rank 1's routers never pick expert 0 (tests/distributed_run.py gives its selection score -1e4 on that rank
only), and training runs under torch DDP, FSDP1 and FSDP2 (a plain loop, launched with torchrun) and under
``accelerate launch`` + ``loramix.train`` (DDP; FSDP where accelerate enables it). Every launch runs under a
timeout that kills its process group, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
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

import loramix
from helpers.tiny_lm import save_tiny_lm
from helpers.tiny_models import tiny_model

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
TIMEOUT = 240  # seconds per launch; a run takes a small fraction of that, a hang never ends
ROWS = [{"Context": f"question {i}: how do I cope with stress at work?",
         "Response": f"answer {i}: breathe, rest and talk to someone you trust."} for i in range(48)]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; [] elsewhere). torchrun starts each rank in a session of its
    own, so killing the launcher's process group leaves the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def launch(cmd: list[str], cwd: Path = HERE, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the launcher and every process below it (the
    ranks run in sessions of their own) and fail."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        below = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {TIMEOUT} s (hang); last stderr:\n{err[-3000:]}")
    assert proc.returncode == 0 or not check, err[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(mode: str, out: Path, expert_type: str = "mixlora", port: int = 29631) -> None:
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
            str(HERE / "distributed_run.py"), "loop", "--mode", mode, "--expert-type", expert_type,
            "--out", str(out), "--starve-rank", "1", "--starve-expert", "0"])


def rank_results(out: Path, mode: str) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    return [(json.loads((out / f"{mode}_rank{r}.json").read_text()), load_file(out / f"{mode}_rank{r}.safetensors"))
            for r in (0, 1)]


def assert_starved(counts: list[dict[str, list[int]]]) -> None:
    """Expert 0 got no token on rank 1 and some on rank 0, in every MoE layer."""
    for name in counts[0]:
        assert counts[1][name][0] == 0 and sum(counts[1][name]) > 0, (name, counts[1][name])
        assert counts[0][name][0] > 0, (name, counts[0][name])


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0, what: str = "") -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=f"{what}: {name}")


def check_loop_run(out: Path, mode: str, expert_type: str) -> dict[str, torch.Tensor]:
    """Ranks agree, expert 0 was starved on rank 1, training moved the weights (expert 0's too), and the
    adapter rank 0 saved from the gathered tensors loads back with those values."""
    (info0, w0), (info1, w1) = rank_results(out, mode)
    assert info0["sharded"] == info1["sharded"] == mode.startswith("fsdp")
    assert_starved([info0["counts"], info1["counts"]])
    assert_same(w0, w1, what=f"{mode}: rank 0 vs rank 1")
    b_name = "mixlora_adapters.lora_B" if expert_type == "adapter" else "mixlora_experts.up.lora_B"
    trained = [t for n, t in w0.items() if n.endswith(b_name)]  # (E, out, r), zero at init
    assert len(trained) == 2 and all(t[0].abs().max() > 0 for t in trained)  # expert 0 learned from rank 0
    reloaded = loramix.load_adapter(tiny_model("llama", seed=0), out / f"{mode}_adapter")
    assert_same(loramix.checkpoint.trainable_state_dict(reloaded), w0, what=f"{mode}: saved adapter")
    return w0


def test_fsdp2_with_an_expert_starved_on_one_rank(tmp_path):
    """FSDP2 (fully_shard per decoder layer and at the root): no hang, both ranks gather the same weights, and
    the adapter saved from rank 0 alone (as loramix.train saves it) holds them. (Adapter experts, FSDP1 and
    DDP: the slow test below.)"""
    torchrun("fsdp2", tmp_path)
    check_loop_run(tmp_path, "fsdp2", "mixlora")


@pytest.mark.slow
@pytest.mark.parametrize("expert_type", ["mixlora", "adapter"])
def test_ddp_fsdp1_fsdp2_train_the_same_weights_with_a_starved_expert(tmp_path, expert_type):
    """The same per-rank batches under DDP (find_unused_parameters=False), FSDP1 (use_orig_params) and FSDP2
    give the same weights: sharding changes nothing, and no wrapper waits for a gradient that never comes."""
    weights = {}
    for port, mode in enumerate(("ddp", "fsdp1", "fsdp2")):
        torchrun(mode, tmp_path, expert_type, port=29641 + port)
        weights[mode] = check_loop_run(tmp_path, mode, expert_type)
    assert_same(weights["fsdp1"], weights["ddp"], atol=1e-6, what="fsdp1 vs ddp")
    assert_same(weights["fsdp2"], weights["ddp"], atol=1e-6, what="fsdp2 vs ddp")


def test_save_adapter_from_gathered_tensors(tmp_path):
    """save_adapter(tensors=...) (how one rank saves a sharded model) writes what save_adapter(model) writes,
    and refuses tensors that are not the adapter's."""
    model = loramix.inject(tiny_model("llama", seed=0), loramix.MixLoraConfig(num_experts=4, top_k=2, r=4))
    loramix.save_adapter(model, tmp_path / "plain")
    tensors = loramix.checkpoint.trainable_state_dict(model)
    loramix.save_adapter(model, tmp_path / "given", tensors)
    assert_same(load_file(tmp_path / "given" / "adapter_model.safetensors"),
                load_file(tmp_path / "plain" / "adapter_model.safetensors"))
    metas = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("plain", "given")]
    for meta in metas:  # (safetensors orders its header's metadata arbitrarily: the files' hashes may differ)
        del meta["weights_sha256"]
    assert metas[0] == metas[1] and metas[0]["base_weights"]["tensors"] > 0
    with pytest.raises(ValueError, match="not the adapter's: .*embed_tokens"):
        loramix.save_adapter(model, tmp_path / "bad", {**tensors, **model.model.embed_tokens.state_dict(
            prefix="model.embed_tokens.")})


def test_adapter_scale_is_one_dimensional_and_old_scalar_scales_load(tmp_path):
    """fully_shard refuses 0-dim parameters, so adapter experts keep their scale as shape (1,); an adapter saved
    with the scale as a 0-dim tensor still loads."""
    from safetensors.torch import save_file

    from loramix.checkpoint import sha256_file

    config = loramix.MixLoraConfig(num_experts=2, top_k=1, r=4, expert_type="adapter", adapter_scale_init=0.5)
    model = loramix.inject(tiny_model("llama", seed=0), config)
    scales = {n: p for n, p in model.named_parameters() if n.endswith("mixlora_scale")}
    assert scales and all(p.shape == (1,) for p in scales.values())
    loramix.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({n: t.reshape(()) if n.endswith("mixlora_scale") else t for n, t in tensors.items()}, weights)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    meta["weights_sha256"] = sha256_file(weights)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    assert all(t.dim() == 0 for n, t in load_file(weights).items() if n.endswith("mixlora_scale"))
    reloaded = loramix.load_adapter(tiny_model("llama", seed=0), tmp_path / "a")
    assert all(float(p) == 0.5 and p.shape == (1,) for n, p in reloaded.named_parameters() if n in scales)


# --- accelerate launch + loramix.train ----------------------------------------------------------------
@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny_lm(d / "model")
    data = d / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    return model_dir, str(data)


def accelerate_train(run_inputs, out: Path, launcher: list[str], extra: tuple[str, ...] = (), check: bool = True,
                     **kw) -> list[dict] | subprocess.CompletedProcess:
    model_dir, data = run_inputs
    options = dict(model=model_dir, data=data, output_dir=str(out), max_steps=4, eval_steps=2, num_experts=4,
                   top_k=2, r=4, attn_r=4, batch_size=2, val_size=0, plots=False, learning_rate=5e-3, seed=1)
    options.update(kw)
    done = launch([shutil.which("accelerate", path=str(BIN)), "launch", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", *launcher, str(HERE / "distributed_run.py"),
                   "trainer", "--options", json.dumps(options), "--starve-rank", "1", "--starve-expert", "0", *extra],
                  check=check)
    if not check:
        return done
    return [json.loads((out / "rank_counts" / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_trainer_ranks_agree(out: Path) -> None:
    digests = sorted((out / "rank_digests").glob("rank*.txt"))
    assert len(digests) == 2 and digests[0].read_text() == digests[1].read_text()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_ddp_with_an_expert_starved_on_one_rank(run_inputs, tmp_path):
    ranks = accelerate_train(run_inputs, tmp_path / "run", ["--multi_gpu"])
    assert not any(r["sharded"] for r in ranks)
    assert_starved([r["counts"] for r in ranks])
    assert_trainer_ranks_agree(tmp_path / "run")


@pytest.mark.slow
def test_accelerate_sigterm_on_one_process_stops_both_at_the_same_step(run_inputs, tmp_path):
    """SIGTERM reaches process 1 alone, during step 3 of 6: both processes save checkpoint-3 and stop there
    (every rank's RNG state is in it), with the same weights."""
    out = tmp_path / "run"
    accelerate_train(run_inputs, out, ["--multi_gpu"], ("--term-rank", "1", "--term-step", "3"),
                     max_steps=6, eval_steps=100)
    summaries = [json.loads((out / "rank_counts" / f"summary{r}.json").read_text()) for r in (0, 1)]
    assert summaries[0] == summaries[1] == {"steps": 3, "interrupted": True, "stop_signal": "SIGTERM"}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert {p.name for p in (out / "checkpoint-3").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    digests = sorted((out / "rank_digests").glob("rank*.txt"))
    assert len(digests) == 2 and digests[0].read_text() == digests[1].read_text()


@pytest.mark.slow
def test_accelerate_a_full_disk_on_the_main_process_stops_both(run_inputs, tmp_path):
    """The main process's checkpoint-4 writes fail as on a full disk, process 1's succeed: both stop there (no
    hang), the partial checkpoint is removed and the adapter of step 4 is saved alone."""
    out = tmp_path / "run"
    done = accelerate_train(run_inputs, out, ["--multi_gpu"], ("--full-disk-rank", "0", "--full-disk-step", "4"),
                            check=False, max_steps=6, eval_steps=2)
    assert done.returncode != 0
    assert f"{out}: the disk is full: checkpoint-4 needs about " in done.stderr
    assert f"the adapter of step 4 alone is saved in {out / 'adapter-step-4'}" in done.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["adapter-step-4", "checkpoint-2"]


@pytest.mark.slow
def test_accelerate_fsdp_with_an_expert_starved_on_one_rank(run_inputs, tmp_path):
    launcher = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_state_dict_type",
                "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "false"]
    ranks = accelerate_train(run_inputs, tmp_path / "run", launcher)
    if not all(r["sharded"] for r in ranks):
        pytest.skip(f"accelerate {__import__('accelerate').__version__} ran `--use_fsdp` as "
                    f"{ranks[0]['distributed_type']} without sharding: it enables FSDP only on accelerator devices "
                    "(MULTI_GPU, MULTI_XPU, ...), never on CPU (no error is raised). FSDP1/FSDP2 themselves run on "
                    "CPU: test_fsdp2_with_an_expert_starved_on_one_rank and "
                    "test_ddp_fsdp1_fsdp2_train_the_same_weights_with_a_starved_expert")
    assert_starved([r["counts"] for r in ranks])
    assert_trainer_ranks_agree(tmp_path / "run")
