"""Speed / memory benchmark: base model vs PEFT LoRA vs loramix MixLoRA (per router) vs official ``mixlora``.

``loramix bench`` and ``bench/run_bench.py`` (a source checkout) are its command lines; the rest of the library
never imports it.

Every variant is a fresh deep copy of one loaded base model and all are measured in the same process:

1. each variant is built (a fresh copy of the model modules sharing the frozen weights, see
   :func:`fresh_copy`) and warmed up in turn (``max(warmup, 1)`` training step(s), forward and decode);
   its memory is measured during this phase: on CUDA the peak of ``torch.cuda.max_memory_allocated`` minus
   the allocation before the variant, on CPU the peak resident set size (RSS, sampled every 2 ms) minus
   the RSS before the variant. Either way the figure is what training this variant adds on top of the
   frozen weights (``base_weights_mb``): adapters, activations, gradients and optimizer state;
   ``memory_metric`` in the result says which one was used;
2. the timed work then runs in ``steps`` rounds with the variants interleaved (rotating order), so a
   changing load on a shared machine hits every variant alike, after ``warmup`` untimed interleaved
   training rounds (steady state: see :func:`_timed_rounds`); figures are medians over the rounds:

* training: an AdamW step (forward + backward + optimizer) on random token ids, ``batch_size x seq_len``,
  labels = inputs (loramix adds its router aux loss) -> step time and tokens/s;
* inference: a no-grad forward of the same batch (``infer_step_s``);
* decoding: greedy ``generate`` of exactly ``decode_tokens`` new tokens, batch 1, after a ``prompt_len``
  prompt, KV cache on (``decode_tokens_per_s`` = new tokens / wall time, prefill included);
* trainable parameters.

With ``export_decode``, each MixLoRA variant is also exported (:func:`loramix.export.export_adapted`, the
checkpoint ``loramix export`` writes) and loaded back with ``AutoModelForCausalLM.from_pretrained``: the
``exported_<router>`` rows time its inference and decoding with transformers in the same interleaved rounds
(no training; their memory figure is the loaded checkpoint). With a vLLM interpreter (``vllm_python``, or
vLLM importable here) the base and each exported checkpoint are also decoded by vLLM's offline ``LLM``
(``vllm_decode.py`` beside this file, one process, models interleaved round by round, same prompt and token count):
the ``vllm_*`` rows, whose ``decode / base`` is relative to ``vllm_base`` measured in that same process.
Each variant is also exported with ``format="vllm"`` (loramix's native MixLoRA model, base weights once) and
decoded there with loramix's plugin (``vllm_native_<router>`` rows; :func:`vllm_plugin_env`). vLLM runs with
``enforce_eager`` (``vllm_modes=("eager",)``), in its default compiled mode (``"compiled"``: the same rows
prefixed ``vllm_compiled_``, against ``vllm_compiled_base``), or both, one vLLM process per mode.

The base model has nothing to train; its "training step" is the **floor**: forward + backward through the
frozen model to its input embeddings (no weight gradients, no optimizer). Every adapter's step does this
work plus its own, so ``floor_vs_official`` (floor / official step) is the lowest step ratio to the official
package that any adapter of this model can reach on this machine. It also gives the inference and decoding
reference. The official ``mixlora`` package (PyPI ``mixlora==0.2.3``) is measured when it is importable:
its experts live in plain dicts, so its trainable tensors are collected by hand, and that package has no
router aux loss (the MoE-PEFT trainer adds it), so its step does slightly less work than ours.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import importlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loramix.allocator import ENV_SWITCH, tune_malloc

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_STEP_RATIO = 1.15  # MixLoRA training step <= 1.15 x PEFT LoRA step
TARGET_DECODE_RATIO = 0.8  # MixLoRA decode >= 0.8 x base tokens/s
TARGET_OFFICIAL_RATIO = 0.6  # MixLoRA training step <= 0.6 x the official mixlora package's step


# --------------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc, else psutil, else peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        scale = 1 if platform.system() == "Darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


class PeakRSS:
    """Samples the process RSS in a background thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _release_memory(device: torch.device) -> None:
    """Free what the previous variant left: Python garbage, glibc's cached heap, CUDA's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def count_trainable(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------------
def _linear_targets(model: nn.Module) -> list[str] | str:
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    found = [t for t in LORA_TARGETS if t in present]
    return found or "all-linear"


def make_peft_lora(base: nn.Module, *, r: int = 16, alpha: float = 32, dropout: float = 0.05) -> tuple[nn.Module, list]:
    """PEFT LoRA on q,k,v,o,gate,up,down (every linear layer except the LM head on other families)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=_linear_targets(base),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def make_loramix(
    base: nn.Module,
    *,
    router: str = "topk",
    num_experts: int = 8,
    top_k: int = 2,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
) -> tuple[nn.Module, list]:
    """loramix MixLoRA: ``num_experts`` rank-r experts on gate/up/down + rank-r attention LoRA."""
    from loramix.config import MixLoraConfig
    from loramix.injection import inject

    cfg = MixLoraConfig(
        num_experts=num_experts,
        top_k=top_k,
        r=r,
        alpha=alpha,
        dropout=dropout,
        router=router,
        attn_r=r,
        attn_alpha=alpha,
        attn_dropout=dropout,
    )
    model = inject(base, cfg)
    return model, [p for p in model.parameters() if p.requires_grad]


def official_mixlora_available() -> str | None:
    """None when the official package can be used, else the reason it cannot."""
    try:
        importlib.import_module("mixlora")
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"official package not importable ({type(e).__name__}: {e}); pip install --no-deps mixlora==0.2.3"
    return None


def make_official_mixlora(
    base: nn.Module,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
) -> tuple[nn.Module, list]:
    """The official ``mixlora`` package's MixLoRA (same experts, rank, targets and top-k as ours).

    Its injector takes initial weights, so A gets the PEFT/kaiming-style init, B = 0 and a small router,
    exactly what training starts from. Expert LoRAs live in plain dicts (not registered sub-modules), so
    the trainable tensors are gathered by hand.
    """
    import math

    from mixlora import MixLoraConfig as OfficialConfig
    from mixlora import inject_adapter_in_model

    model_type = getattr(base.config, "model_type", "")
    raw = {
        "base_model_name_or_path": "bench",
        "task_type": "CAUSAL_LM",
        "peft_type": "MIXLORA",
        "routing_strategy": "mixlora",
        "act_fn": getattr(base.config, "hidden_act", "silu"),
        "r": r,
        "lora_alpha": int(alpha),
        "lora_dropout": dropout,
        "target_modules": list(LORA_TARGETS),
        "num_experts": num_experts,
        "top_k": top_k,
    }
    cfg = OfficialConfig.from_config(raw)
    cfg.adapter_name_, cfg.dtype_ = "default", next(base.parameters()).dtype
    cfg.check()
    cfg.model_type_ = model_type
    weights: dict[str, torch.Tensor] = {}
    hidden = base.config.hidden_size

    def lora_pair(out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.empty(r, in_f)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return a, torch.zeros(out_f, r)

    for i, layer in enumerate(base.model.layers):
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(num_experts, hidden) * 0.02
        for name in LORA_TARGETS:
            if hasattr(layer.self_attn, name):
                out_f, in_f = getattr(layer.self_attn, name).weight.shape
                a, b = lora_pair(out_f, in_f)
                weights[f"mixlora.layers.{i}.self_attn.{name}.lora_A.weight"] = a
                weights[f"mixlora.layers.{i}.self_attn.{name}.lora_B.weight"] = b
            elif hasattr(layer.mlp, name):
                out_f, in_f = getattr(layer.mlp, name).weight.shape
                for e in range(num_experts):
                    a, b = lora_pair(out_f, in_f)
                    weights[f"mixlora.layers.{i}.mlp.{name}.experts.{e}.lora_A.weight"] = a
                    weights[f"mixlora.layers.{i}.mlp.{name}.experts.{e}.lora_B.weight"] = b
    for p in base.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(base, cfg, weights)
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for module in base.modules():
        moes = getattr(module, "mixlora_moes", None)
        if not moes:
            continue
        for moe in moes.values():
            moe.gate_ = moe.gate_.detach().clone().requires_grad_(True)
            params.append(moe.gate_)
            for lora in moe.experts_.values():
                lora.to(next(base.parameters()).device)
                for p in (lora.lora_A.weight, lora.lora_B.weight):
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p.requires_grad_(True))
    for name, p in base.named_parameters():
        if "lora_" in name and id(p) not in seen:  # attention LoraLinear modules are registered
            seen.add(id(p))
            params.append(p.requires_grad_(True))
    base._bench_official_loras = [  # the expert LoraLinears, to switch their dropout with train()/eval()
        lora
        for m in base.modules()
        for moe in (getattr(m, "mixlora_moes", None) or {}).values()
        for lora in moe.experts_.values()
    ]
    return base, params


def _set_mode(model: nn.Module, training: bool) -> None:
    model.train(training)
    for lora in getattr(model, "_bench_official_loras", []):  # the official package's dict-held experts
        lora.train(training)


# --------------------------------------------------------------------------------------------------
# measuring one variant
# --------------------------------------------------------------------------------------------------
class VariantRunner:
    """One prepared variant (model, optimizer, fixed random inputs); each ``*_step`` runs one unit of work.

    ``timed(kind)`` runs one ``train`` / ``infer`` / ``decode`` unit and records its wall time, so
    :func:`run_benchmark` can interleave the variants round by round (on a shared machine the load then
    hits every variant alike).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        params: list[torch.Tensor],
        *,
        batch_size: int,
        seq_len: int,
        decode_tokens: int,
        prompt_len: int,
        device: torch.device,
        vocab_size: int,
        train: bool = True,
        seed: int = 0,
        merge: Callable[[nn.Module], nn.Module] | None = None,
        compile_decode: Callable[[nn.Module], Any] | None = None,
    ) -> None:
        from transformers import GenerationConfig

        self.name, self.model, self.params, self.device = name, model, params, device
        self.train = train
        self.merge = merge  # folds what can be folded into the base weights, for the merged-decode figure
        self.merged = False
        self.compile_decode = compile_decode  # compiles the merged model's decoding path (loramix variants)
        self.compiled = False
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
        self.mask = torch.ones_like(self.ids)
        self.prompt = torch.randint(0, vocab_size, (1, prompt_len), generator=gen).to(device)
        self.tokens_per_step = batch_size * seq_len
        self.opt = torch.optim.AdamW(params, lr=1e-4) if train and params else None
        self.gen_cfg = GenerationConfig(  # exactly decode_tokens new tokens: EOS never stops it early
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
        )
        self.decode_new_tokens = 0
        self.times: dict[str, list[float]] = {
            "train": [],
            "infer": [],
            "decode": [],
            "decode_merged": [],
            "decode_compiled": [],
        }
        self.peak_memory_mb = float("nan")

    def train_step(self) -> None:
        """One AdamW step: forward with labels (loramix adds its aux loss), backward, update. Without
        trainable parameters (the base model): the floor, forward + backward to the input embeddings."""
        _set_mode(self.model, True)
        if self.opt is None:
            embeds = self.model.get_input_embeddings()(self.ids).detach().requires_grad_()  # (B, T, D)
            self.model(inputs_embeds=embeds, attention_mask=self.mask, labels=self.ids).loss.backward()
            return
        loss = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step(self) -> None:
        _set_mode(self.model, False)
        self.model(input_ids=self.ids, attention_mask=self.mask)

    @torch.no_grad()
    def decode_step(self) -> None:
        _set_mode(self.model, False)
        seq = self.model.generate(
            input_ids=self.prompt, attention_mask=torch.ones_like(self.prompt), generation_config=self.gen_cfg
        )
        self.decode_new_tokens = int(seq.shape[1] - self.prompt.shape[1])

    @torch.no_grad()
    def decode_merged_step(self) -> None:
        """Decoding after ``merge`` (done once, untimed by the caller's warm-up): the deployment figure."""
        self._merge_once()
        self.decode_step()

    def _merge_once(self) -> None:
        if not self.merged:
            self.model = self.merge(self.model)
            self.merged = True

    @torch.no_grad()
    def decode_compiled_step(self) -> None:
        """Decoding after ``merge`` with the decoding path compiled (``loramix generate --merge --compile-decode``)."""
        if not self.compiled:
            self._merge_once()
            self.compile_decode(self.model)
            self.compiled = True
        self.decode_step()

    def timed(self, kind: str) -> float:
        _sync(self.device)
        start = time.perf_counter()
        getattr(self, f"{kind}_step")()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.times[kind].append(elapsed)
        return elapsed

    def figures(self) -> dict[str, Any]:
        """Medians of the recorded times, as the result's per-variant figures."""
        med = {k: statistics.median(v) if v else None for k, v in self.times.items()}
        train_s = med["train"]
        return {
            "trainable_params": count_trainable(self.params),
            "train_step_s": train_s,
            "train_step_s_all": self.times["train"] or None,
            "train_tokens_per_s": self.tokens_per_step / train_s if train_s else None,
            "peak_memory_mb": self.peak_memory_mb,
            "infer_step_s": med["infer"],
            "infer_tokens_per_s": self.tokens_per_step / med["infer"] if med["infer"] else None,
            "decode_s": med["decode"],
            "decode_s_all": self.times["decode"],
            "decode_new_tokens": self.decode_new_tokens,
            "decode_tokens_per_s": self.decode_new_tokens / med["decode"] if med["decode"] else None,
            "decode_merged_tokens_per_s": (
                self.decode_new_tokens / med["decode_merged"] if med["decode_merged"] else None
            ),
            "decode_compiled_tokens_per_s": (
                self.decode_new_tokens / med["decode_compiled"] if med["decode_compiled"] else None
            ),
            "decode_compiled_layers": _compiled_layers(self.model) if self.compiled else None,
        }


def _compiled_layers(model: nn.Module) -> int:
    """MixLoRA layers whose decoding path is still compiled (one that failed to compile fell back)."""
    from loramix.compiled import moe_layers

    return sum(layer._compiled is not None for layer in moe_layers(model))


def measure_variant(
    model: nn.Module,
    params: list[torch.Tensor],
    *,
    steps: int,
    warmup: int,
    train: bool = True,
    **runner_kwargs: Any,
) -> dict[str, Any]:
    """Measure one prepared model on its own (no interleaving, no memory figure): warm-up, then
    ``steps`` timed units of each kind. ``runner_kwargs`` are :class:`VariantRunner`'s keywords."""
    runner = VariantRunner("variant", model, params, train=train, **runner_kwargs)
    kinds = ("train", "infer", "decode") if train else ("infer", "decode")
    for kind in kinds:
        for _ in range(warmup):
            getattr(runner, f"{kind}_step")()
        for _ in range(steps):
            runner.timed(kind)
    return runner.figures()



# --------------------------------------------------------------------------------------------------
# exported checkpoints (transformers and vLLM decode)
# --------------------------------------------------------------------------------------------------
VLLM_SCRIPT = Path(__file__).with_name("vllm_decode.py")
VLLM_MARK = "LORAMIX_VLLM_DECODE "  # the result line of VLLM_SCRIPT


def export_for_bench(base: nn.Module, directory: Path, *, seed: int, format: str = "auto",
                     **mixlora: Any) -> dict[str, Any] | str:
    """Export a MixLoRA variant (built as the ``mixlora_<router>`` row is: same seed, same options) to
    ``directory`` in ``format``; returns what the export reports, or the reason it cannot be exported."""
    from loramix.export import ExportError, export_adapted

    if any(p.dtype != torch.float32 for p in base.parameters()):
        return "export needs a float32 model (run the bench with dtype float32)"
    torch.manual_seed(seed)
    model, _ = make_loramix(copy.deepcopy(base), **mixlora)  # its own weights: export merges attention in place
    try:  # speed only: switch's capacity and a trained balance bias do not change the work per token
        report = export_adapted(model, directory, check=False, allow_approximate=True, format=format)
    except ExportError as e:
        return f"no export: {' '.join(str(e).split())}"
    finally:
        del model
        gc.collect()
    return {"architecture": report.architecture, "num_experts": report.num_experts,
            "experts_per_token": report.experts_per_token, "exported_params": report.exported_params,
            "exported_bytes": report.exported_bytes, "base_bytes": report.base_bytes,
            "approximations": report.approximations}


def load_exported(directory: Path, device: torch.device) -> nn.Module:
    """An exported checkpoint as users load it: ``AutoModelForCausalLM.from_pretrained`` (float32), frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).to(device).eval()
    model.requires_grad_(False)
    _touch(model)
    return model


def find_vllm_python(vllm_python: str | None = None) -> tuple[str | None, str]:
    """(python, "") for the interpreter that runs vLLM, or (None, why not)."""
    given = vllm_python or os.environ.get("LORAMIX_VLLM_PYTHON")
    if given:
        if not Path(given).is_file():
            return None, f"no vLLM python at {given} (vllm_python / LORAMIX_VLLM_PYTHON)"
        return given, ""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, ""
    return None, "vLLM not found: pass vllm_python (--vllm-python) or set LORAMIX_VLLM_PYTHON"


def bench_prompt(vocab: int, batch_size: int, seq_len: int, prompt_len: int, seed: int) -> list[int]:
    """The decode prompt every :class:`VariantRunner` uses (same generator, same draws)."""
    gen = torch.Generator().manual_seed(seed)
    torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    return torch.randint(0, vocab, (1, prompt_len), generator=gen)[0].tolist()


def vllm_plugin_env(tmp: Path) -> dict[str, str]:
    """PYTHONPATH entries that let vLLM load loramix's plugin (``--format vllm`` rows) from this loramix, installed
    or not: a minimal dist-info declaring the ``vllm.general_plugins`` entry point, and loramix's parent dir."""
    import loramix

    dist = tmp / "vllm_plugin_site" / "loramix_bench_plugin-0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loramix-bench-plugin\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[vllm.general_plugins]\nloramix = loramix.vllm_plugin:register\n")
    paths = [str(dist.parent), str(Path(loramix.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def vllm_env(tmp: Path, threads: int | None = None) -> dict[str, str]:
    """The environment of a :data:`VLLM_SCRIPT` run: a small KV cache (unless set), a compile cache under ``tmp``
    (compiled mode builds this code's graphs, not a cached one), and with ``threads`` that many threads without
    pinning to cores, as the transformers rows run."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CACHE_ROOT": str(tmp / "vllm_cache")}
    if threads is not None:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads))
    return env


def run_vllm_decode(python: str, job: dict[str, Any], env: dict[str, str]) -> tuple[dict | None, str]:
    """Run :data:`VLLM_SCRIPT` on ``job`` with ``python``: (its per-model times, "") or (None, why it failed)."""
    try:
        run = subprocess.run([python, str(VLLM_SCRIPT), json.dumps(job)], capture_output=True, text=True, env=env,
                             timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"vLLM run failed: {e}"
    lines = [line for line in run.stdout.splitlines() if line.startswith(VLLM_MARK)]
    if run.returncode != 0 or not lines:
        tail = " ".join((run.stderr or run.stdout).strip().splitlines()[-3:])
        return None, f"vLLM run failed (exit {run.returncode}): {tail[-600:]}"
    return json.loads(lines[-1].removeprefix(VLLM_MARK)), ""


#: vLLM's modes the vLLM rows can run in: row-name prefix and the ``enforce_eager`` value
VLLM_MODES = {"eager": ("vllm_", True), "compiled": ("vllm_compiled_", False)}


def _vllm_rows(base: nn.Module, exported: dict[str, Any], tmp: Path, vllm_python: str | None,
               skipped: dict[str, str], say: Callable[[str], Any], *, steps: int, warmup: int, decode_tokens: int,
               prompt_len: int, vocab: int, common: dict[str, Any], threads: int | None,
               modes: Sequence[str] = ("eager",)) -> dict[str, dict]:
    python, why = find_vllm_python(vllm_python)
    if python is None:
        skipped["vllm"] = why
        return {}
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)
    paths = {"base": str(base_dir), **{name: str(e["dir"]) for name, e in exported.items()}}
    env = {**vllm_env(tmp, threads), **vllm_plugin_env(tmp)}
    rows = {}
    for mode in modes:
        prefix, eager = VLLM_MODES[mode]
        models = {prefix + name: path for name, path in paths.items()}
        job = {"models": models, "steps": steps, "warmup": max(warmup, 1), "decode_tokens": decode_tokens,
               "prompt": bench_prompt(vocab, common["batch_size"], common["seq_len"], prompt_len, common["seed"]),
               "max_model_len": prompt_len + decode_tokens + 16, "eager": eager}
        say(f"[bench] vLLM decode ({mode}) of {', '.join(models)} ({python}) ...")
        result, why = run_vllm_decode(python, job, env)
        if result is None:
            skipped[prefix + "*"] = why
            continue
        for name, times in result.items():
            med = statistics.median(times["decode_s_all"])
            rows[name] = {**_empty_figures(), "decode_s": med, "decode_s_all": times["decode_s_all"],
                          "decode_new_tokens": times["decode_new_tokens"],
                          "decode_tokens_per_s": times["decode_new_tokens"] / med if med else None,
                          "engine": f"vllm {times.get('vllm_version', '')} {mode}"}
            say(f"[bench] {name}: decode {rows[name]['decode_tokens_per_s']:.1f} tok/s")
    return rows


def _empty_figures() -> dict[str, Any]:
    return {"trainable_params": 0, "train_step_s": None, "train_step_s_all": None, "train_tokens_per_s": None,
            "peak_memory_mb": None, "infer_step_s": None, "infer_tokens_per_s": None,
            "decode_merged_tokens_per_s": None, "decode_compiled_tokens_per_s": None, "decode_compiled_layers": None}

# --------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures were measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fresh_copy(base: nn.Module) -> nn.Module:
    """A new model object that shares ``base``'s frozen parameters (no second copy of the weights).

    Every module (and buffer) is deep-copied, so adapters injected into the copy never touch ``base``;
    the parameters themselves are shared, which is safe because every variant keeps them frozen and
    untouched (only adapter tensors are trained). This keeps the memory of holding all variants at once
    to their adapters, so the variants can be interleaved.
    """
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters()})


@torch.no_grad()
def _touch(model: nn.Module) -> None:
    """Read one value per 4 KiB page of every weight, so memory-mapped checkpoint pages are resident
    before any measurement (otherwise the first variant's RSS delta would include paging the weights in)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel():
            t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


def _load_base(model_spec: Any, device: torch.device, dtype: str | torch.dtype) -> nn.Module:
    if isinstance(model_spec, nn.Module):
        return model_spec.to(device)
    from loramix.models import load_base_model

    model, _ = load_base_model(model_spec, dtype=dtype, device=device)
    return model


def frozen_base(
    model_spec: Any = None, device: torch.device | str = "cpu", dtype: str | torch.dtype = "float32"
) -> nn.Module:
    """The base model every variant shares: loaded, in eval mode, frozen, its weights paged in."""
    base = _load_base(model_spec, torch.device(device), dtype).eval()
    base.requires_grad_(False)
    _touch(base)
    return base


def run_benchmark(
    model_spec: Any = None,
    *,
    batch_size: int = 4,
    seq_len: int = 128,
    steps: int = 5,
    warmup: int = 2,
    routers: Sequence[str] = ("topk",),
    include_official: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    decode_tokens: int = 32,
    prompt_len: int = 16,
    num_experts: int = 8,
    top_k: int = 2,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    seed: int = 0,
    threads: int | None = None,
    interleave: bool = True,
    compile_decode: bool = True,
    export_decode: bool = False,
    vllm_python: str | None = None,
    vllm_modes: Sequence[str] = ("eager",),
    log: Callable[[str], Any] | None = print,
) -> dict[str, Any]:
    """Measure base / PEFT LoRA / MixLoRA (each router) / official mixlora in one run.

    Args:
        model_spec: a loaded ``nn.Module`` (used as the base and copied per variant) or anything
            ``loramix.models.load_base_model`` accepts (``None`` = the default SmolLM2-135M-Instruct).
        routers: one MixLoRA variant per router name (``topk``, ``noisy_topk``, ``switch``, ``dense``,
            ``top_p``).
        include_official: also measure the official ``mixlora`` package when importable (else it is listed
            under ``skipped`` with the reason).
        threads: torch CPU threads for the run (restored afterwards); ``None`` keeps the current setting.
            On a CPU shared with other busy processes use 1: with more threads than free cores every
            parallel op can wait a whole scheduler slice for a descheduled worker thread.
        interleave: keep every variant alive and time them in interleaved rounds (robust to a changing
            load on a shared machine); ``False`` builds, times and frees one variant after the other (least
            memory: only one adapted model at a time).
        compile_decode: also time loramix decoding with the attention LoRA merged and the decoding path
            compiled (:func:`loramix.compiled.compile_decoding`), the ``decode_compiled`` figure.
        export_decode: also export each MixLoRA variant as a standard MoE checkpoint and time its decoding
            with transformers (``exported_<router>`` rows) and, when vLLM is found, with vLLM (``vllm_*`` rows).
        vllm_python: the Python of a virtualenv with vLLM, for the ``vllm_*`` rows (default:
            ``$LORAMIX_VLLM_PYTHON``, else this interpreter when it imports vllm, else those rows are skipped).
        vllm_modes: vLLM's modes for those rows: ``eager`` (``enforce_eager``; rows ``vllm_*``) and/or
            ``compiled`` (vLLM's default, compiling each model once as it loads; rows ``vllm_compiled_*``). Each
            mode runs in its own vLLM process; its rows' ``decode / base`` is against its own base row.
        log: progress messages (``None`` = silent).

    Returns ``{"config", "machine", "memory_metric", "variants": {name: figures}, "ratios", "targets",
    "skipped"}``; see :func:`format_table` for a readable view.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="loramix-bench-") as tmp:
            return _run_in(
                model_spec, dev, log or (lambda s: None), Path(tmp), batch_size=batch_size, seq_len=seq_len,
                steps=steps, warmup=warmup, routers=routers, include_official=include_official, dtype=dtype,
                decode_tokens=decode_tokens, prompt_len=prompt_len, num_experts=num_experts, top_k=top_k, r=r,
                alpha=alpha, dropout=dropout, seed=seed, interleave=interleave, compile_decode=compile_decode,
                export_decode=export_decode, vllm_python=vllm_python, threads=threads,
                vllm_modes=tuple(vllm_modes),
            )
    finally:
        torch.set_num_threads(previous_threads)


def _run_in(
    model_spec: Any,
    dev: torch.device,
    say: Callable[[str], Any],
    tmp: Path,
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    routers: Sequence[str],
    include_official: bool,
    dtype: str | torch.dtype,
    decode_tokens: int,
    prompt_len: int,
    num_experts: int,
    top_k: int,
    r: int,
    alpha: float,
    dropout: float,
    seed: int,
    interleave: bool,
    compile_decode: bool,
    export_decode: bool,
    vllm_python: str | None,
    threads: int | None,
    vllm_modes: tuple[str, ...] = ("eager",),
) -> dict[str, Any]:
    unknown = [m for m in vllm_modes if m not in VLLM_MODES]
    if unknown:
        raise ValueError(f"vllm_modes: {unknown} unknown; expected some of {sorted(VLLM_MODES)}")
    torch.manual_seed(seed)
    malloc_tuned = tune_malloc()  # before any variant, so every one of them runs with the same allocator
    base = frozen_base(model_spec, dev, dtype)
    vocab = int(base.config.vocab_size)
    common = dict(
        batch_size=batch_size,
        seq_len=seq_len,
        decode_tokens=decode_tokens,
        prompt_len=prompt_len,
        device=dev,
        vocab_size=vocab,
        seed=seed,
    )
    builders: dict[str, Callable[[nn.Module], tuple[nn.Module, list]] | None] = {"base": None}
    builders["peft_lora"] = lambda m: make_peft_lora(m, r=r, alpha=alpha, dropout=dropout)
    for router in routers:
        builders[f"mixlora_{router}"] = lambda m, router=router: make_loramix(
            m, router=router, num_experts=num_experts, top_k=top_k, r=r, alpha=alpha, dropout=dropout
        )
    from loramix.merge import merge_attention

    mergers: dict[str, Callable[[nn.Module], nn.Module]] = {"peft_lora": lambda m: m.merge_and_unload()}
    mergers.update({f"mixlora_{router}": merge_attention for router in routers})
    from loramix.compiled import compile_decoding

    compilers = {f"mixlora_{router}": compile_decoding for router in routers} if compile_decode else {}
    skipped: dict[str, str] = {}
    if include_official:
        reason = official_mixlora_available()
        model_type = getattr(base.config, "model_type", "")
        if reason is None and model_type not in ("llama", "gemma", "gemma2", "qwen2", "mistral"):
            reason = f"official package has no support for model_type {model_type!r}"
        if reason is None:
            builders["official_mixlora"] = lambda m: make_official_mixlora(
                m, num_experts=num_experts, top_k=top_k, r=r, alpha=int(alpha), dropout=dropout
            )
        else:
            skipped["official_mixlora"] = reason
    exported: dict[str, Any] = {}
    native: dict[str, Any] = {}  # --format vllm exports
    if export_decode:
        for router in routers:
            name = f"exported_{router}"
            directory = tmp / name
            reason = export_for_bench(base, directory, seed=seed, router=router, num_experts=num_experts,
                                      top_k=top_k, r=r, alpha=alpha, dropout=dropout)
            if isinstance(reason, str):
                skipped[name] = reason
                continue
            exported[name] = {"dir": directory, **reason}
            builders[name] = lambda m, d=directory: (load_exported(d, dev), [])
        for router in routers:  # loramix's native vLLM model: vLLM rows only
            name = f"native_{router}"
            reason = export_for_bench(base, tmp / name, seed=seed, format="vllm", router=router,
                                      num_experts=num_experts, top_k=top_k, r=r, alpha=alpha, dropout=dropout)
            if isinstance(reason, str):
                skipped[name] = reason
            else:
                native[name] = {"dir": tmp / name, **reason}
    runners: dict[str, VariantRunner] = {}
    variants: dict[str, dict[str, Any]] = {}
    for name, build in builders.items():  # 1) build + warm up each variant; its memory is measured here
        say(f"[bench] preparing {name} ...")
        _release_memory(dev)
        before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _rss_bytes()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        torch.manual_seed(seed)
        with PeakRSS() as rss:
            model = fresh_copy(base)
            model, params = (model, []) if build is None else build(model)
            runner = VariantRunner(  # the base "trains" too: its step is the frozen forward + backward floor
                name,
                model,
                params,
                merge=mergers.get(name),
                compile_decode=compilers.get(name),
                train=name not in exported,
                **common,
            )
            for _ in range(max(warmup, 1)):  # the first training step allocates grads + optimizer state
                if runner.train:
                    runner.train_step()
                runner.infer_step()
                runner.decode_step()
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss.peak
        runner.peak_memory_mb = (peak - before) / 2**20
        del model, params
        if interleave:
            runners[name] = runner
            continue
        _timed_rounds({name: runner}, steps)  # sequential mode: time it now, then free it
        variants[name] = runner.figures()
        say(f"[bench] {name}: " + _one_line(variants[name]))
        del runner
    if interleave:  # 2) timed rounds, variants interleaved, order rotated
        _timed_rounds(runners, steps, say, warmup=warmup)
        variants = {name: r.figures() for name, r in runners.items()}
        for name, f in variants.items():
            say(f"[bench] {name}: " + _one_line(f))
    runners.clear()  # the vLLM process below needs the memory
    _release_memory(dev)
    if exported or native:
        variants.update(_vllm_rows(base, {**exported, **native}, tmp, vllm_python, skipped, say, steps=steps,
                                   warmup=warmup, decode_tokens=decode_tokens, prompt_len=prompt_len, vocab=vocab,
                                   common=common, threads=threads, modes=vllm_modes))
    result = {
        "config": {
            "batch_size": batch_size,
            "seq_len": seq_len,
            "steps": steps,
            "warmup": warmup,
            "decode_tokens": decode_tokens,
            "prompt_len": prompt_len,
            "num_experts": num_experts,
            "top_k": top_k,
            "r": r,
            "alpha": alpha,
            "dropout": dropout,
            "routers": list(routers),
            "dtype": str(dtype),
            "interleaved": interleave,
            "compile_decode": compile_decode,
            "export_decode": export_decode,
            "vllm_modes": list(vllm_modes),
            "model": getattr(base.config, "_name_or_path", None) or type(base).__name__,
        },
        "machine": {**machine_info(dev), "malloc_tuned": malloc_tuned, ENV_SWITCH: os.environ.get(ENV_SWITCH)},
        "memory_metric": "cuda_peak_allocated_delta" if dev.type == "cuda" else "cpu_peak_rss_delta",
        "base_weights_mb": sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20,
        "variants": variants,
        "skipped": skipped,
        "exported": {name: {k: v for k, v in e.items() if k != "dir"} for name, e in {**exported, **native}.items()},
    }
    result["ratios"], result["targets"] = _ratios(variants)
    del base, runners
    _release_memory(dev)
    return result


def _timed_rounds(
    runners: dict[str, VariantRunner], steps: int, say: Callable[[str], Any] | None = None, warmup: int = 0
) -> None:
    """``steps`` timed rounds of each kind of work; within a round the variants run in rotating order.

    ``warmup`` untimed training rounds come first, interleaved the same way: the first training steps of
    a variant among the others page-fault in the memory its step needs (on CPU, MixLoRA top-2 faulted in
    about 1.2 GB in each of its first two such steps, which made them nearly twice as slow).
    """
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            if runners[name].train:
                runners[name].train_step()
    for kind in ("train", "infer", "decode", "decode_merged", "decode_compiled"):
        if kind == "decode_merged":  # merging ends training for that model: last, after an untimed warm-up
            names = [n for n in names if runners[n].merge is not None]
        if kind == "decode_compiled":  # the untimed warm-up compiles
            names = [n for n in names if runners[n].compile_decode is not None]
        if kind in ("decode_merged", "decode_compiled"):
            if not names:
                break
            for name in names:
                getattr(runners[name], f"{kind}_step")()
        for i in range(steps):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                if kind != "train" or runners[name].train:
                    runners[name].timed(kind)
        if say is not None:
            say(f"[bench] timed {kind} ({steps} rounds)")


def _one_line(f: dict[str, Any]) -> str:
    step = f"{f['train_step_s'] * 1000:.0f} ms/step" if f.get("train_step_s") else "no training"
    return f"{step}, decode {f['decode_tokens_per_s']:.1f} tok/s, peak {f['peak_memory_mb']:.0f} MiB"


def _ratios(variants: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, float | None]], dict[str, Any]]:
    lora, base = variants.get("peft_lora"), variants.get("base")
    official = variants.get("official_mixlora")
    ratios: dict[str, dict[str, float | None]] = {}
    targets: dict[str, Any] = {}

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b not in (None, 0) else None

    vllm_base, vllm_compiled_base = variants.get("vllm_base"), variants.get("vllm_compiled_base")
    for name, f in variants.items():
        # each engine (and vLLM mode) against its own base model
        ref = (vllm_compiled_base if name.startswith("vllm_compiled_") else vllm_base if name.startswith("vllm_")
               else base)
        ratios[name] = {
            "step_vs_lora": div(f.get("train_step_s"), lora and lora.get("train_step_s")),
            "step_vs_official": div(f.get("train_step_s"), official and official.get("train_step_s")),
            "tokens_per_s_vs_lora": div(f.get("train_tokens_per_s"), lora and lora.get("train_tokens_per_s")),
            "memory_vs_lora": div(f.get("peak_memory_mb"), lora and lora.get("peak_memory_mb")),
            "decode_vs_base": div(f.get("decode_tokens_per_s"), ref and ref.get("decode_tokens_per_s")),
            "decode_merged_vs_base": div(
                f.get("decode_merged_tokens_per_s"), base and base.get("decode_tokens_per_s")
            ),
            "decode_compiled_vs_base": div(
                f.get("decode_compiled_tokens_per_s"), base and base.get("decode_tokens_per_s")
            ),
        }
        if name.startswith("mixlora_"):
            step, dec = ratios[name]["step_vs_lora"], ratios[name]["decode_vs_base"]
            targets[name] = {
                "step_vs_lora": step,
                "step_target": TARGET_STEP_RATIO,
                "step_target_met": step is not None and step <= TARGET_STEP_RATIO,
                "decode_vs_base": dec,
                "decode_target": TARGET_DECODE_RATIO,
                "decode_target_met": dec is not None and dec >= TARGET_DECODE_RATIO,
                # the deployment setting: attention LoRA merged, decoding path compiled
                "decode_compiled_vs_base": ratios[name]["decode_compiled_vs_base"],
                "decode_compiled_target_met": (ratios[name]["decode_compiled_vs_base"] or 0) >= TARGET_DECODE_RATIO,
                "step_vs_official": ratios[name]["step_vs_official"],
                "official_target": TARGET_OFFICIAL_RATIO,
                "official_target_met": (
                    None if official is None else (ratios[name]["step_vs_official"] or 1e9) <= TARGET_OFFICIAL_RATIO
                ),
                # the frozen model's own forward + backward over the official step: no adapter goes below it
                "floor_vs_official": div(base and base.get("train_step_s"), official and official.get("train_step_s")),
                # what the adapter adds on top of the floor, relative to what PEFT LoRA adds
                "overhead_vs_lora_overhead": div(
                    _minus(f.get("train_step_s"), base and base.get("train_step_s")),
                    _minus(lora and lora.get("train_step_s"), base and base.get("train_step_s")),
                ),
            }
    return ratios, targets


def _minus(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_benchmark` result (ratios to PEFT LoRA / to the base model)."""
    mem = "peak mem MiB (CUDA alloc)" if result["memory_metric"].startswith("cuda") else "peak RSS delta MiB"
    head = (
        "| variant | trainable params | train step ms | train tok/s | step / LoRA | step / official | "
        + mem
        + " | mem / LoRA | infer step ms | decode tok/s | decode / base | merged decode / base"
        + " | merged+compiled decode / base |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(v: float | None, pattern: str) -> str:
        return "-" if v is None else pattern.format(v)

    for name, f in result["variants"].items():
        rt = result["ratios"][name]
        step_ms = f["train_step_s"] * 1000 if f["train_step_s"] is not None else None
        cells = [
            name,
            f"{f['trainable_params']:,}",
            fmt(step_ms, "{:.0f}"),
            fmt(f["train_tokens_per_s"], "{:.0f}"),
            fmt(rt["step_vs_lora"], "{:.2f}x"),
            fmt(rt.get("step_vs_official"), "{:.2f}x"),
            fmt(f["peak_memory_mb"], "{:.0f}"),
            fmt(rt["memory_vs_lora"], "{:.2f}x"),
            fmt(f["infer_step_s"] and f["infer_step_s"] * 1000, "{:.0f}"),
            fmt(f["decode_tokens_per_s"], "{:.1f}"),
            fmt(rt["decode_vs_base"], "{:.2f}x"),
            fmt(rt.get("decode_merged_vs_base"), "{:.2f}x"),
            fmt(rt.get("decode_compiled_vs_base"), "{:.2f}x"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, reason in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {reason} ||||||||||||")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# profiling
# --------------------------------------------------------------------------------------------------
def profile_training_step(
    model_spec: Any = None,
    *,
    variant: str = "mixlora_topk",
    batch_size: int = 4,
    seq_len: int = 128,
    steps: int = 2,
    device: str | torch.device | None = None,
    row_limit: int = 25,
    sort_by: str = "self_cpu_time_total",
    mode: str = "train",
    decode_tokens: int = 32,
) -> dict[str, Any]:
    """torch.profiler view of one variant (``base``, ``peft_lora`` or ``mixlora_<router>``).

    ``mode="train"``: AdamW training steps on ``batch_size x seq_len`` random ids; ``mode="decode"``: greedy
    generation of ``decode_tokens`` tokens (batch 1, 16-token prompt), one "step" = one ``generate`` call.

    Returns ``{"table": str (top ops), "modules": {record name: ms}}``; the ``modules`` entry sums the time
    spent inside the MixLoRA layer's parts (router, frozen projections, expert LoRA, index ops) via
    ``record_function`` ranges added around them with forward hooks, so the layer's cost can be split
    without editing it.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = _load_base(model_spec, dev, "float32").eval()
    if mode not in ("train", "decode"):
        raise ValueError(f"mode must be 'train' or 'decode', got {mode!r}")
    model = fresh_copy(base)
    params: list[torch.Tensor] = []
    if variant == "peft_lora":
        model, params = make_peft_lora(model)
    elif variant.startswith("mixlora_"):
        model, params = make_loramix(model, router=variant.split("_", 1)[1])
    elif variant != "base" or mode == "train":
        raise ValueError(f"unknown variant {variant!r} (base can only be profiled with mode='decode')")
    handles = _add_ranges(model)
    vocab = int(base.config.vocab_size)
    if mode == "train":
        ids = torch.randint(0, vocab, (batch_size, seq_len), device=dev)
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()

        def step() -> None:
            with record_function("bench.forward"):
                loss = model(input_ids=ids, labels=ids).loss
            with record_function("bench.backward"):
                loss.backward()
            with record_function("bench.optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
    else:
        from transformers import GenerationConfig

        model.eval()
        prompt = torch.randint(0, vocab, (1, 16), device=dev)
        gcfg = GenerationConfig(
            max_new_tokens=decode_tokens,
            min_new_tokens=decode_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )

        def step() -> None:
            with torch.no_grad(), record_function("bench.generate"):
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gcfg)

    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    for h in handles:
        h.remove()
    events = prof.key_averages()
    modules = {e.key: e.cpu_time_total / 1000 / steps for e in events if e.key.startswith(("bench.", "mixlora."))}
    return {"table": events.table(sort_by=sort_by, row_limit=row_limit), "modules": modules, "steps": steps}


def _add_ranges(model: nn.Module) -> list[Any]:
    """Wrap MixLoRA layer parts in profiler ranges (forward only) through forward pre/post hooks."""
    from torch.autograd.profiler import record_function

    handles = []
    for name, module in model.named_modules():
        kind = None
        if type(module).__name__ == "MixLoraFFN":
            kind = "mixlora.ffn_total"
        elif name.endswith(".mlp"):
            kind = "bench.mlp_total"  # the plain (or PEFT-wrapped) FFN, for comparison
        elif name.endswith(".self_attn"):
            kind = "bench.attn_total"
        elif name.endswith("mixlora_router"):
            kind = "mixlora.router"
        elif type(module).__name__ == "ExpertLoRA":
            kind = None  # used through loramix.grouped, not forward(): covered by ffn_total
        elif ".mlp.base." in name + "." and isinstance(module, nn.Linear):
            kind = "mixlora.frozen_proj"
        if kind is None:
            continue
        ranges: list[Any] = []

        def pre(mod: nn.Module, args: Any, kind: str = kind, ranges: list = ranges) -> None:
            r = record_function(kind)
            r.__enter__()
            ranges.append(r)

        def post(mod: nn.Module, args: Any, out: Any, ranges: list = ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles
