"""A skill router in front of an OpenAI-compatible engine serving the skills as LoRA adapters (vLLM multi-LoRA).

:class:`SkillRouter` reads a ``loramix skills export`` directory, embeds each prompt as the library does and
runs the library's gate: the chosen skill is the name of the adapter to ask for. :func:`create_app` wraps it in
an OpenAI-compatible HTTP proxy (FastAPI): a request for ``model="auto"`` (or no model) is routed, its
``model`` field replaced by the chosen adapter's name, and forwarded to the upstream server; the response
comes back unchanged, with the routing in ``X-Loramix-*`` headers. A request naming a model itself is
forwarded as it is.

Routing follows ``loramix skills route`` in ``top1`` mode with the library's threshold and fallback:

* the chosen skill's adapter serves the request;
* below the gate's ``threshold`` with fallback ``base``, or when the chosen skill is not in the export
  (``--skip-unsupported`` / ``--skills``), the upstream's base model serves it;
* below the threshold with fallback ``soft``: an engine applies one adapter per request, so the top skill
  serves it and ``X-Loramix-Confident: false`` says the gate was unsure.

The text the gate sees is what it was trained on: the user turns of the request (those after the last
assistant turn; system turns left out), joined by newlines. ``/v1/completions`` routes on the prompt.

The web parts need the ``serve`` extra (``pip install 'loramix[serve]'``: fastapi, uvicorn, httpx).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .export import ROUTER_DIR, read_export
from .library import SkillLibrary, SkillLibraryError
from .request import ROUTE_MODEL as ROUTE_MODEL  # importable from here as before
from .request import prompt_from_messages as prompt_from_messages

BASE = "<base>"
SERVE_EXTRA = "serve"
SERVE_PACKAGES = ("fastapi", "uvicorn", "httpx")


def require_serve_extra(*packages: str) -> None:
    """Raise an ImportError naming the ``serve`` extra when one of ``packages`` is missing."""
    import importlib.util

    missing = [p for p in packages or SERVE_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(
            f"the skill router's HTTP proxy needs {', '.join(missing)}: install the serve extra with "
            f"`pip install 'loramix[{SERVE_EXTRA}]'` (fastapi, uvicorn, httpx)"
        )


@dataclass
class Route:
    """The gate's decision for one prompt."""

    skill: str
    """The skill the gate chose (top weight), or ``<base>`` when the policy falls back to the base model."""
    model: str | None
    """The upstream model to ask: the skill's adapter, or None for the base model."""
    weights: dict[str, float] = field(default_factory=dict)
    confident: bool = True
    reason: str = ""
    scores: dict[str, float] | None = None
    """Per-skill gate scores where the gate reports them apart from the weights."""

    def headers(self) -> dict[str, str]:
        out = {"X-Loramix-Skill": self.skill, "X-Loramix-Confident": str(self.confident).lower(),
               "X-Loramix-Weights": json.dumps(self.weights, separators=(",", ":"))}
        if self.scores is not None and self.scores != self.weights:
            out["X-Loramix-Scores"] = json.dumps(self.scores, separators=(",", ":"))
        return out


class SkillRouter:
    """The gate of a skills export: prompt -> :class:`Route` (which adapter to ask for).

    Args:
        export_dir: a ``loramix skills export`` directory.
        model: load the base model (for the ``base`` embedder) from here instead of the export's record.
        device: where the prompt embedder runs (default CPU).
        gate_temperature / threshold / fallback: override the library's gate defaults.
    """

    def __init__(self, export_dir: str | Path, *, model: str | None = None, device: str | None = "cpu",
                 gate_temperature: float | None = None, threshold: float | None = None,
                 fallback: str | None = None) -> None:
        from .api import check_policy

        check_policy("top1", threshold, fallback)
        if gate_temperature is not None and not gate_temperature > 0:
            raise SkillLibraryError(f"gate_temperature must be > 0, got {gate_temperature}")
        self.export_dir = Path(export_dir).expanduser()
        self.manifest = read_export(self.export_dir)
        self.library = SkillLibrary.open(self.export_dir / self.manifest["router"])
        self.served = [s["name"] for s in self.manifest["skills"]]
        self.skills = self.library.names
        unknown = sorted(set(self.served) - set(self.skills))
        if unknown:
            raise SkillLibraryError(f"{self.export_dir}: skills {unknown} are exported but not in {ROUTER_DIR}/")
        self.options = {"gate_temperature": gate_temperature, "threshold": threshold, "fallback": fallback}
        self.device = device
        self.base = self.tokenizer = None
        if self.library.manifest["embedder"]["kind"] == "base":
            from ..models import load_base_model
            from .library import base_fingerprint

            spec = model or self.manifest["base"]["model"]
            self.base, self.tokenizer = load_base_model(None if spec == "default" else spec, device=device)
            self.library.check_base(base_fingerprint(self.base), spec)
        self._lock = threading.Lock()

    def route(self, prompts: str | list[str]) -> list[Route]:
        """One :class:`Route` per prompt, as ``loramix skills route --mode top1`` decides it."""
        from .api import check_prompts, route_prompts

        prompts = check_prompts(prompts)
        with self._lock:  # one embedding forward at a time
            decision, _ = route_prompts(self.library, prompts, self.skills, mode="top1", base=self.base,
                                 tokenizer=self.tokenizer, device=self.device, **self.options)
        routes = []
        for row in decision.rows(prompts):
            top, confident, applied = row["top"], row["confident"], row["applied"]
            if BASE in applied:
                skill, model, reason = BASE, None, "below the gate's threshold"
            elif top not in self.served:
                skill, model, reason = top, None, f"skill {top!r} is not exported"
            else:
                skill, model = top, top
                reason = "" if confident else "below the gate's threshold (fallback soft: top skill)"
            routes.append(Route(skill, model, row["weights"], confident, reason, row.get("scores")))
        return routes


def create_app(router: Any, upstream: str, **options: Any) -> Any:
    """The OpenAI-compatible proxy app (see :func:`loramix.skills.proxy.create_app`); needs the serve extra."""
    require_serve_extra()
    from .proxy import create_app as _create_app

    return _create_app(router, upstream, **options)


def skills_serve(
    export_dir: str,
    upstream: str = "http://localhost:8000",
    host: str = "127.0.0.1",
    port: int = 8100,
    base_name: str | None = None,
    api_key: str | None = None,
    gate_temperature: float | None = None,
    threshold: float | None = None,
    fallback: str | None = None,
    model: str | None = None,
    device: str | None = "cpu",
) -> dict[str, Any]:
    """Serve an OpenAI-compatible skill router in front of a vLLM server of a `loramix skills export`.

    Requests with model "auto" (or none) are routed by the library's gate to the chosen skill's adapter;
    the routing is reported in X-Loramix-Skill / X-Loramix-Weights / X-Loramix-Model response headers.
    Needs the serve extra: pip install 'loramix[serve]'.

    Args:
        export_dir: a `loramix skills export` directory.
        upstream: the vLLM server's URL (started with the command `loramix skills export` prints).
        host: address to listen on.
        port: port to listen on.
        base_name: the upstream's name for the base model (default: read from its /v1/models).
        api_key: API key sent upstream when a request carries none (vLLM's --api-key).
        gate_temperature: routing softmax temperature (default: the library's).
        threshold: below this top weight the library's fallback applies (default: the library's).
        fallback: below the threshold: base (send to the base model) or soft (send to the top skill).
        model: load the base model for the prompt embedder from here instead of the export's record.
        device: where the prompt embedder runs.
    """
    require_serve_extra()
    import uvicorn

    from ..checks import check_int

    check_int("port", port, 0)
    if port > 65535:
        raise ValueError(f"port must be <= 65535, got {port}")
    router = SkillRouter(export_dir, model=model, device=device, gate_temperature=gate_temperature,
                         threshold=threshold, fallback=fallback)
    app = create_app(router, upstream, base_name=base_name, api_key=api_key)
    print(f"loramix skill router: {len(router.served)} skill(s) {router.served} -> {upstream}; "
          f"listening on http://{host}:{port}/v1 (model 'auto' routes)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return {"export_dir": str(export_dir), "upstream": upstream, "host": host, "port": port}
