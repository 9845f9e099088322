"""A skill library: independent skill adapters trained on one frozen base, plus the gate that picks them.

Layout of a library directory::

    manifest.json                      the source of truth (written last, atomically)
    skills/<name>/adapter/             loramix adapter (save_adapter) + tokenizer files
    skills/<name>/gate_prompts.safetensors   prompt embeddings of the skill (gate training and replay)
    skills/<name>/run/                 training summary, metrics, resolved config (informational)
    gate/gate-v<N>.safetensors + .json the current gate (N = manifest["gate"]["version"])

``manifest.json`` records the base model (spec and a content fingerprint), the prompt embedder, the current
gate files and, per skill: adapter directory, adapter type, data source, creation time and the SHA-256 of
every stored file, so ``verify`` can prove earlier skills were never touched. A skill directory not named
in the manifest (an interrupted ``skills_add``) is ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .._version import __version__
from ..checkpoint import atomic_write, save_tensors, sha256_file
from ..injection import architecture_fingerprint

MANIFEST = "manifest.json"
FORMAT = "loramix-skills"
FORMAT_VERSION = 1
PROMPTS_FILE = "gate_prompts.safetensors"
TEXTS_FILE = "gate_texts.json"
MIXED_PREFIX = "mixed:"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SkillLibraryError(ValueError):
    """The skill library (or a request against it) is invalid; the message says what and where."""


def hash_tree(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (sorted, POSIX separators)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture fingerprint plus a hash of the base weights' contents.

    Two bases with the same architecture but different weights (another fine-tune) must not share a
    library: the adapters were trained on one of them. Weights are hashed after a cast to bfloat16, so the
    same checkpoint loaded in float32 or bfloat16 gives the same hash.
    """
    info = architecture_fingerprint(model)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if t.is_floating_point():
            t = t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    info["weights_sha256"] = h.hexdigest()
    return info


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SkillLibraryError(
            f"invalid skill name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit"
        )
    return name


@dataclass
class SkillEntry:
    """One skill as recorded in the manifest."""

    name: str
    adapter_dir: str
    """Relative to the library root."""
    adapter_type: str
    """``mixlora`` or ``lora`` (the ``adapter`` option of ``loramix.train.train``)."""
    data: str
    """The data source the adapter and the gate row were trained on."""
    created: str
    files: dict[str, str]
    """``{path relative to the library root: sha256}`` of every file stored for this skill."""
    num_prompts: int
    """Prompt embeddings stored for the gate."""
    train_options: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    """A few numbers of the training run (steps, losses, seconds)."""


class SkillLibrary:
    """Read/write access to a library directory; every change goes through ``write_manifest``."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest

    # --- opening / creating ----------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> SkillLibrary:
        root = Path(root).expanduser()
        if not root.exists():
            raise SkillLibraryError(
                f"no skill library at {root}: the directory does not exist (create one with `skills_add`)"
            )
        if not root.is_dir():
            raise SkillLibraryError(f"{root} is a file, not a skill library directory")
        path = root / MANIFEST
        if not path.is_file():
            raise SkillLibraryError(f"{root} is not a skill library: {MANIFEST} is missing")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkillLibraryError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SkillLibraryError(f"{path}: not a loramix skill library manifest (format != {FORMAT!r})")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise SkillLibraryError(f"{path}: format_version {manifest['format_version']} is newer than this loramix")
        for key in ("base", "embedder", "skills"):
            if key not in manifest:
                raise SkillLibraryError(f"{path}: missing key {key!r}")
        lib = cls(root, manifest)
        lib.entries()  # validates the skill records
        return lib

    @classmethod
    def create(cls, root: str | os.PathLike[str], *, model: str, fingerprint: dict[str, Any],
               embedder: dict[str, Any]) -> SkillLibrary:
        """A new, empty library (the manifest is written by the first ``write_manifest``)."""
        root = Path(root).expanduser()
        if root.exists() and (not root.is_dir() or any(p.name != ".lock" for p in root.iterdir())):
            raise SkillLibraryError(
                f"{root} exists and is not a skill library (no {MANIFEST}); choose a new or empty directory"
            )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "loramix_version": __version__,
            "created": now_iso(),
            "base": {"model": model, "fingerprint": fingerprint},
            "embedder": embedder,
            "gate": None,
            "skills": [],
        }
        return cls(root, manifest)

    def write_manifest(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest["loramix_version"] = __version__
        text = json.dumps(self.manifest, indent=2)
        atomic_write(self.root / MANIFEST, lambda tmp: Path(tmp).write_text(text))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock while a skill is added (two concurrent adds would race for the manifest)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise SkillLibraryError(f"{self.root} is locked by another `skills_add`") from e
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- skills ----------------------------------------------------------------------------------
    def entries(self) -> list[SkillEntry]:
        known = {f.name for f in dataclasses.fields(SkillEntry)}
        out = []
        for i, rec in enumerate(self.manifest["skills"]):
            if not isinstance(rec, dict) or set(rec) - known or "name" not in rec:
                raise SkillLibraryError(f"{self.root / MANIFEST}: skill record {i} is malformed: {rec!r}")
            try:
                out.append(SkillEntry(**rec))
            except TypeError as e:
                raise SkillLibraryError(f"{self.root / MANIFEST}: skill record {i}: {e}") from e
        return out

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def entry(self, name: str) -> SkillEntry:
        for e in self.entries():
            if e.name == name:
                return e
        raise SkillLibraryError(f"unknown skill {name!r}; the library at {self.root} has: {', '.join(self.names)}")

    def resolve_names(self, names: list[str] | None) -> list[str]:
        """``names`` checked against the library (None = every skill, in library order)."""
        if names is None:
            return self.names
        if isinstance(names, str):
            names = [names]
        for n in names:
            self.entry(n)
        if len(set(names)) != len(names):
            raise SkillLibraryError(f"skill names repeated in {names}")
        return list(names)

    def add_entry(self, entry: SkillEntry) -> None:
        if entry.name in self.names:
            raise SkillLibraryError(f"skill {entry.name!r} already exists in {self.root}")
        self.manifest["skills"].append(dataclasses.asdict(entry))

    def adapter_path(self, name: str) -> Path:
        return self.root / self.entry(name).adapter_dir

    def _prompt_tensors(self, name: str) -> dict[str, torch.Tensor]:
        path = self.root / "skills" / name / PROMPTS_FILE
        if not path.is_file():
            raise SkillLibraryError(f"{path} is missing: the library is damaged")
        return load_file(path)

    def prompt_embeddings(self, name: str) -> torch.Tensor:
        """The skill's stored single-skill gate prompt embeddings."""
        return self._prompt_tensors(name)["embeddings"]

    def mixed_embeddings(self, name: str) -> list[tuple[torch.Tensor, tuple[str, str]]]:
        """Composed prompts stored with skill ``name`` (asking for it and one earlier skill) and their skills."""
        out = []
        for key, t in sorted(self._prompt_tensors(name).items()):
            if key.startswith(MIXED_PREFIX):
                out.append((t, (key[len(MIXED_PREFIX):], name)))
        return out

    def gate_texts(self, name: str) -> dict[str, list[str]]:
        """``{"instructions": [...], "contents": [...]}`` of a skill (empty lists for a skill stored without)."""
        path = self.root / "skills" / name / TEXTS_FILE
        if not path.is_file():
            return {"instructions": [], "contents": []}
        data = json.loads(path.read_text())
        return {"instructions": list(data.get("instructions", [])), "contents": list(data.get("contents", []))}

    def verify(self, names: list[str] | None = None) -> dict[str, list[str]]:
        """``{skill: [problems]}``: files missing or whose SHA-256 differs from the manifest."""
        report: dict[str, list[str]] = {}
        for name in self.resolve_names(names):
            problems = []
            for rel, digest in self.entry(name).files.items():
                p = self.root / rel
                if not p.is_file():
                    problems.append(f"missing {rel}")
                elif sha256_file(p) != digest:
                    problems.append(f"changed {rel}")
            report[name] = problems
        return report

    # --- base model ------------------------------------------------------------------------------
    @property
    def model_spec(self) -> str:
        return self.manifest["base"]["model"]

    def check_base(self, fingerprint: dict[str, Any], model: str | None = None) -> None:
        """Refuse a base model whose fingerprint differs from the one the library was built on."""
        expected = self.manifest["base"]["fingerprint"]
        diff = {k: (v, fingerprint.get(k)) for k, v in expected.items() if fingerprint.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: library has {a!r}, model has {b!r}" for k, (a, b) in diff.items())
            raise SkillLibraryError(
                f"base model {model or '(given)'} differs from the library's base {self.model_spec!r} "
                f"({details}); a skill library holds adapters of one frozen base only"
            )

    # --- gate ------------------------------------------------------------------------------------
    def gate_paths(self) -> tuple[Path, Path] | None:
        gate = self.manifest.get("gate")
        if not gate:
            return None
        return self.root / gate["weights"], self.root / gate["config"]


def save_prompt_embeddings(path: Path, embeddings: torch.Tensor,
                           mixed: dict[str, torch.Tensor] | None = None) -> None:
    """``embeddings`` (single-skill prompts) and, per earlier skill, the composed prompts' embeddings."""
    tensors = {"embeddings": embeddings.detach().float().cpu().contiguous()}
    for other, t in (mixed or {}).items():
        tensors[MIXED_PREFIX + other] = t.detach().float().cpu().contiguous()
    save_tensors(path, tensors, metadata={"producer": FORMAT})
