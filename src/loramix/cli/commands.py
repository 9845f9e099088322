"""Plain functions behind `loramix generate|chat|eval|compare|bench`: load, call the library, report.

Each signature is the CLI's flag list and each ``Args:`` docstring its help text.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from ..checks import check_int, check_number
from ..export import DEFAULT_TOLERANCE


def check_sampling(
    max_new_tokens: Any, temperature: Any, top_p: Any, top_k: Any, repetition_penalty: Any = 1.0
) -> None:
    """Generation options: a length >= 1, temperature >= 0, top_p in (0, 1], top_k >= 0 (0 = off),
    repetition_penalty > 0."""
    check_int("max_new_tokens", max_new_tokens, 1)
    check_number("repetition_penalty", repetition_penalty, 0.0, low_open=True)
    check_number("temperature", temperature, 0.0)
    check_number("top_p", top_p, 0.0, 1.0, low_open=True)
    check_int("top_k", top_k, 0)


def generate_command(
    prompt: str,
    model: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    chat_template: bool = True,
    system: str | None = None,
    device: str | None = None,
    merge: bool = False,
    compile_decode: bool = False,
    strict_base: bool = False,
) -> None:
    """Generate a reply to one prompt, streamed to the terminal, from the base model or base + adapter.

    Args:
        prompt: the user message (the model's chat template is applied).
        model: base model: hub id, local directory, .gguf file; default = packaged SmolLM2-135M-Instruct.
        adapter: a loramix (or PEFT LoRA) adapter directory, e.g. runs/quickstart/adapter.
        max_new_tokens: length limit of the reply.
        temperature: 0 = greedy decoding.
        top_p: nucleus sampling mass.
        top_k: sample among the k most likely tokens.
        repetition_penalty: above 1 makes tokens already in the prompt or the reply less likely (1.1 to 1.3
            stops small models from looping, greedy decoding included); 1 = off.
        chat_template: apply the tokenizer's chat template.
        system: optional system message.
        device: cpu, cuda, cuda:1 ... (default: CUDA when available).
        merge: fold the attention LoRA into the base weights first (faster decoding, same outputs up to
            rounding).
        compile_decode: torch.compile each MixLoRA layer's per-token path (the first reply waits
            some seconds while it compiles; later tokens are faster).
        strict_base: refuse an adapter trained on a base with different weights (default: a warning).
    """
    from ..generation import generate, load_for_inference

    check_sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    model_obj, tokenizer = load_for_inference(
        model, adapter, device=device, merge=merge, compile_decode=compile_decode, strict_base=strict_base
    )
    generate(model_obj, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
             top_k=top_k, repetition_penalty=repetition_penalty, chat_template=chat_template, stream=True,
             system=system)


def chat_command(
    model: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    system: str | None = None,
    device: str | None = None,
    merge: bool = False,
    compile_decode: bool = False,
    strict_base: bool = False,
) -> None:
    """Interactive chat with streamed replies and history (/reset clears it, /exit quits).

    Args:
        model: base model: hub id, local directory, .gguf file; default = packaged SmolLM2-135M-Instruct.
        adapter: a loramix (or PEFT LoRA) adapter directory.
        max_new_tokens: length limit of each reply.
        temperature: 0 = greedy decoding.
        top_p: nucleus sampling mass.
        top_k: sample among the k most likely tokens.
        repetition_penalty: above 1 makes tokens already in the prompt or the reply less likely (1.1 to 1.3
            stops small models from looping, greedy decoding included); 1 = off.
        system: optional system message.
        device: cpu, cuda ... (default: CUDA when available).
        merge: fold the attention LoRA into the base weights first (faster decoding, same outputs up to
            rounding).
        compile_decode: torch.compile each MixLoRA layer's per-token path (the first reply waits
            some seconds while it compiles; later tokens are faster).
        strict_base: refuse an adapter trained on a base with different weights (default: a warning).
    """
    from ..generation import chat_loop, load_for_inference

    check_sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    model_obj, tokenizer = load_for_inference(
        model, adapter, device=device, merge=merge, compile_decode=compile_decode, strict_base=strict_base
    )
    chat_loop(model_obj, tokenizer, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
              top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)


def eval_command(
    tasks: list[str] | None = None,
    model: str | None = None,
    adapter: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    json_path: str | None = None,
    device: str | None = None,
    max_length: int = 1024,
    stride: int | None = None,
    max_new_tokens: int = 256,
    strict_base: bool = False,
    harness_tasks: list[str] | None = None,
    harness_include: str | None = None,
) -> dict[str, Any]:
    """Evaluate perplexity (wikitext2), multiple-choice accuracy (ARC-Easy, ARC-Challenge, boolq, openbookqa),
    math exact match, or any lm-evaluation-harness task; prints a markdown table.

    Args:
        tasks: task names as a YAML list, e.g. "[wikitext2, ARC-Easy, boolq]".
        model: base model: hub id, local directory, .gguf file; default = packaged SmolLM2-135M-Instruct.
        adapter: a loramix (or PEFT LoRA) adapter directory; none = the base model.
        data_dir: directory of the data sets (default: $LORAMIX_DATA_DIR).
        limit: at most this many items per task (quick runs).
        batch_size: scoring batch size.
        json_path: also write the results as JSON to this file.
        device: cpu, cuda ... (default: CUDA when available).
        max_length: perplexity window in tokens (at most the model's context size).
        stride: perplexity: tokens between window starts (default: half the window).
        max_new_tokens: length limit of the replies scored by the math tasks.
        strict_base: refuse an adapter trained on a base with different weights (default: a warning).
        harness_tasks: lm-evaluation-harness tasks as a YAML list, e.g. "[arc_easy, hellaswag]" (needs the
            lmeval extra: pip install 'loramix[lmeval]'); --limit applies to them too.
        harness_include: a directory of your own lm-eval task YAMLs, for harness_tasks.
    """
    from ..evaluation import check_eval_options, evaluate, results_table, task_path
    from ..generation import load_for_inference

    tasks = [tasks] if isinstance(tasks, str) else list(tasks or [])
    harness_tasks = [harness_tasks] if isinstance(harness_tasks, str) else list(harness_tasks or [])
    if not tasks and not harness_tasks:
        raise ValueError("--tasks: name at least one task, e.g. --tasks \"[wikitext2, boolq]\" (or lm-eval tasks "
                         "with --harness-tasks)")
    check_eval_options(tasks, limit=limit, batch_size=batch_size, max_length=max_length, stride=stride,
                       max_new_tokens=max_new_tokens)  # before the model loads
    for task in tasks:  # the data directory and each task's file, before the model loads
        task_path(task, data_dir)
    manager = None
    if harness_tasks:
        from ..harness import harness_task_manager

        manager = harness_task_manager(harness_tasks, harness_include)  # lm-eval installed, names known
    model_obj, tokenizer = load_for_inference(model, adapter, device=device, strict_base=strict_base)
    results: dict[str, Any] = {"tasks": {}}
    if tasks:
        results = evaluate(model_obj, tokenizer, tasks, data_dir=data_dir, limit=limit, batch_size=batch_size,
                           max_length=max_length, stride=stride, max_new_tokens=max_new_tokens)
    results.update(model=model or "default", adapter=adapter)
    if tasks:
        print(results_table(results))
    if harness_tasks:
        from ..harness import harness_scores, harness_table, lm_eval_model, run_harness

        lm = lm_eval_model(model=model_obj, tokenizer=tokenizer, batch_size=batch_size)
        out = run_harness(lm, harness_tasks, task_manager=manager, limit=limit)
        results["harness"] = {"tasks": harness_scores(out), "n": out.get("n-samples", {})}
        print(harness_table(out))
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str))
    return results


def compare_command(
    data: str | None = None,
    tasks: list[str] | None = None,
    model: str | None = None,
    output_dir: str = "runs/compare",
    max_steps: int = 100,
    eval_limit: int | None = None,
    data_dir: str | None = None,
    config: str | None = None,
    lora_rank: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Base vs LoRA vs MixLoRA: train each adapter with the same budget, evaluate all on the same tasks,
    write compare.md, compare.json and PNG plots.

    Args:
        data: training data file or hub name (several files of one format: comma-separated); default: the
            ``data`` of ``config``.
        tasks: evaluation tasks as a YAML list (default [ARC-Easy, boolq]).
        model: base model (default: packaged SmolLM2-135M-Instruct).
        output_dir: where runs, tables and plots go.
        max_steps: optimiser steps per adapter.
        eval_limit: at most this many items per task.
        data_dir: directory of the evaluation data sets (default: $LORAMIX_DATA_DIR).
        config: a `loramix train` options file (YAML) shared by every run; its output_dir and max_steps
            are replaced by the options above, its data by ``data`` when given.
        lora_rank: rank of the LoRA baseline, or "match" for the rank with MixLoRA's trainable parameters.
        overwrite: replace the runs already in output_dir (otherwise a non-empty run directory is refused).
    """
    from ..compare import compare
    from ..config import ConfigError
    from ..train import load_options_file

    check_int("max_steps", max_steps, 1)
    check_int("eval_limit", eval_limit, 1, optional=True)
    options = load_options_file(config) if config else {}
    data = data or options.get("data")
    if not data:
        raise ConfigError("compare: no training data: pass --data or set data in the --config file")
    for name in ("data", "output_dir", "max_steps", "adapter"):
        options.pop(name, None)
    config_model = options.pop("model", None)
    model = model or config_model
    rank: int | str | None = lora_rank
    if isinstance(lora_rank, str) and lora_rank.isdigit():
        rank = int(lora_rank)
    kwargs: dict[str, Any] = {"model": model, "output_dir": output_dir, "max_steps": max_steps,
                              "eval_limit": eval_limit, "data_dir": data_dir, "lora_rank": rank, **options}
    if overwrite:
        kwargs["overwrite"] = True
    else:  # fail before the base model is evaluated, not when the first adapter run starts
        for name in ("lora", "mixlora"):
            run = Path(output_dir) / name
            if run.is_dir() and any(run.iterdir()):
                raise ConfigError(f"compare: {run} is not empty; pass --overwrite to replace the runs in "
                                  f"{output_dir}, or choose another --output-dir")
    if tasks:
        kwargs["tasks"] = [tasks] if isinstance(tasks, str) else list(tasks)
    return compare(data, **kwargs)


def bench_harness() -> Any:
    """The benchmark harness, :mod:`loramix.benchmark.harness` (imported when ``loramix bench`` runs)."""
    return importlib.import_module("loramix.benchmark.harness")


def bench_command(
    model: str | None = None,
    batch_size: int = 4,
    seq_len: int = 128,
    steps: int = 5,
    routers: list[str] | None = None,
    include_official: bool = True,
    device: str | None = None,
    json_path: str | None = None,
    warmup: int = 3,
    compile_decode: bool = True,
    export_decode: bool = False,
    vllm_python: str | None = None,
    vllm_mode: str = "eager",
    threads: int | None = None,
) -> dict[str, Any]:
    """Training step time, tokens/s, peak memory, decode tokens/s and trainable parameters of base, PEFT LoRA,
    MixLoRA (each router) and the official mixlora package, measured in one run, as ratios to PEFT LoRA.

    Args:
        model: base model (default: packaged SmolLM2-135M-Instruct).
        batch_size: sequences per training step.
        seq_len: tokens per sequence.
        steps: timed steps per variant (after warm-up).
        routers: MixLoRA routers to measure as a YAML list (default [topk]).
        include_official: also measure the official `mixlora` package when it is installed.
        device: cpu, cuda ... (default: CUDA when available).
        json_path: also write the figures as JSON to this file.
        warmup: untimed steps per variant first (the first steps of a MixLoRA run page-fault in its
            memory and are slower than the rest).
        compile_decode: also time decoding with the attention LoRA merged and the decoding path compiled.
        export_decode: also export each MixLoRA variant (loramix export) and time the exported checkpoint's
            decoding with transformers and, when a vLLM interpreter is found, with vLLM.
        vllm_python: the python of a virtualenv with vLLM for the export_decode rows (default:
            $LORAMIX_VLLM_PYTHON).
        vllm_mode: vLLM's mode for those rows: eager (enforce_eager), compiled (vLLM's default: each model is
            compiled as it loads; rows vllm_compiled_*), or both.
        threads: torch CPU threads for the run (default: unchanged); 1 on a CPU other processes keep busy.
    """
    harness = bench_harness()
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("steps", steps)):
        check_int(name, value, 1)
    check_int("warmup", warmup, 0)
    check_int("threads", threads, 1, optional=True)
    if vllm_mode not in ("eager", "compiled", "both"):
        from ..config import ConfigError

        raise ConfigError(f"vllm_mode: must be eager, compiled or both, got {vllm_mode!r}")
    kwargs: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq_len, "steps": steps,
                              "include_official": include_official, "device": device, "warmup": warmup,
                              "compile_decode": compile_decode, "export_decode": export_decode,
                              "vllm_python": vllm_python, "threads": threads,
                              "vllm_modes": ("eager", "compiled") if vllm_mode == "both" else (vllm_mode,)}
    if routers:
        kwargs["routers"] = [routers] if isinstance(routers, str) else list(routers)
    result = harness.run_benchmark(model, **kwargs)
    print(harness.format_table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    return result


def continual_command(config: str | None = None, **options: Any) -> dict[str, Any]:
    """Continual learning on a task stream: novelty detection, growing LoRA experts, maturity routing.

    Trains on tasks arriving one after another without task labels, with sequential-LoRA and multi-task
    baselines, and writes the accuracy matrix, ACC/BWT/FWT/forgetting and the novelty decision log.
    Every ContinualConfig field is a flag.

    Args:
        config: YAML/JSON file of options (flags override it).
    """
    import logging

    from ..continual.run import format_report, run_continual

    if not logging.getLogger().handlers:  # the command line: progress to stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = run_continual(config, **options)
    print(format_report(summary))
    return summary


def export_command(
    adapter: str,
    output_dir: str,
    model: str | None = None,
    format: str = "auto",
    check: bool = True,
    allow_approximate: bool = False,
    dtype: str = "float32",
    check_text: str | None = None,
    check_tokens: int = 128,
    tolerance: float = DEFAULT_TOLERANCE,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a MixLoRA adapter for serving: a standard MoE checkpoint (Mixtral / Qwen2-MoE / Qwen3-MoE) that
    transformers, vLLM and llama.cpp load, or (--format vllm) loramix's native MixLoRA model that vLLM serves
    with loramix's plugin at about the base model's size; prints its size beside the base's and the adapter's.

    Args:
        adapter: the adapter directory, e.g. runs/quickstart/adapter.
        output_dir: where the checkpoint goes.
        model: base model the adapter was trained on (default: packaged SmolLM2-135M-Instruct).
        format: auto (the base's standard MoE: mixtral, qwen2_moe or qwen3_moe), mixtral, qwen2_moe, qwen3_moe,
            or vllm (base weights once plus low-rank experts, exact for every adapter; served by vLLM with
            pip install loramix[vllm]).
        check: compare the written model's logits with loramix's and refuse one that differs (--no-check skips).
        allow_approximate: export adapters the format cannot reproduce exactly (standard MoE formats: a
            trained balance bias; any format: the switch router's capacity limit) and print the measured
            difference.
        dtype: float32, bfloat16 or float16 weights.
        check_text: text or text file for the check (default: a built-in paragraph).
        check_tokens: at most this many tokens of the check text.
        tolerance: largest allowed float32 logit difference relative to the largest |logit|.
        max_shard_size: largest safetensors shard, e.g. 2GB.
        overwrite: replace a non-empty output directory.
    """
    from ..config import ConfigError
    from ..export import export_model

    check_int("check_tokens", check_tokens, 1)  # before the model loads
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output_dir: {out} exists and is not empty; pass --overwrite to replace it")
    report = export_model(adapter, output_dir, model=model, format=format, check=check,
                          allow_approximate=allow_approximate, dtype=dtype, check_text=check_text,
                          check_tokens=check_tokens, tolerance=tolerance, max_shard_size=max_shard_size,
                          overwrite=overwrite)
    print(report.summary())
    return report.to_dict()
