"""The skill router's OpenAI-compatible HTTP proxy (FastAPI); imported only with the ``serve`` extra installed.

Use :func:`loramix.skills.serve.create_app` (it names the extra when a package is missing) or
``loramix skills serve``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .library import SkillLibraryError
from .request import ROUTE_MODEL, prompt_from_messages


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def upstream_v1(upstream: str) -> str:
    """``upstream`` with ``/v1`` at the end (added when missing)."""
    base = upstream.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def create_app(router: Any, upstream: str, *, base_name: str | None = None, api_key: str | None = None,
               client: httpx.AsyncClient | None = None, timeout: float = 600.0) -> FastAPI:
    """An OpenAI-compatible FastAPI app that routes requests with ``router`` and forwards them to ``upstream``.

    Args:
        router: a :class:`loramix.skills.serve.SkillRouter` (anything with ``route([text]) -> [Route]`` and
            ``served``, the exported skill names).
        upstream: the engine's base URL, e.g. ``http://localhost:8000`` (``/v1`` is added when missing).
        base_name: the upstream's name for the base model (default: read from its ``/v1/models``: the model
            that is not an exported skill and has no parent).
        api_key: sent as ``Authorization: Bearer`` upstream when a request carries no Authorization header.
        client: the ``httpx.AsyncClient`` to forward with (default: one made here, closed at shutdown).
        timeout: seconds to wait for the upstream (the client made here).
    """
    base_url = upstream_v1(upstream)
    state: dict[str, Any] = {"client": client, "base_name": base_name}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if client is None and state["client"] is not None:
            await state["client"].aclose()

    app = FastAPI(title="loramix skill router", lifespan=lifespan)

    def http() -> httpx.AsyncClient:
        if state["client"] is None:
            state["client"] = httpx.AsyncClient(timeout=timeout)
        return state["client"]

    def auth_headers(request: Request) -> dict[str, str]:
        given = request.headers.get("authorization")
        if given:
            return {"Authorization": given}
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def upstream_base(request: Request) -> str:
        if state["base_name"] is None:
            resp = await http().get(f"{base_url}/models", headers=auth_headers(request))
            resp.raise_for_status()
            listed = [m for m in resp.json().get("data", []) if m.get("id") not in router.served]
            bases = [m["id"] for m in listed if not m.get("parent")] or [m["id"] for m in listed]
            if not bases:
                raise LookupError("it lists no model besides the skill adapters; pass base_name (--base-name)")
            state["base_name"] = bases[0]
        return state["base_name"]

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": ROUTE_MODEL, "object": "model", "owned_by": "loramix"}]
        data += [{"id": s, "object": "model", "owned_by": "loramix"} for s in router.served]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "skills": list(router.served), "upstream": base_url}

    async def routed_text(body: dict[str, Any], path: str) -> str:
        if path == "chat/completions":
            return prompt_from_messages(body.get("messages"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise SkillLibraryError("routing needs 'prompt' to be one non-empty string (send one prompt per "
                                    "request, or name a model to skip routing)")
        return prompt

    async def forward(request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        headers: dict[str, str] = {}
        if body.get("model") in (None, "", ROUTE_MODEL):
            try:
                text = await routed_text(body, path)
                route = (await run_in_threadpool(router.route, [text]))[0]
            except SkillLibraryError as e:
                return _error(400, str(e))
            try:
                target = route.model or await upstream_base(request)
            except (httpx.HTTPError, LookupError, ValueError) as e:
                return _error(502, f"cannot find the base model's name at {base_url}/models: {e}", "upstream_error")
            body = {**body, "model": target}
            headers = route.headers()
        headers["X-Loramix-Model"] = str(body["model"])
        url = f"{base_url}/{path}"
        send = {"Content-Type": "application/json", **auth_headers(request)}
        try:
            if body.get("stream"):
                resp = await http().send(http().build_request("POST", url, json=body, headers=send), stream=True)

                async def chunks() -> AsyncIterator[bytes]:
                    try:
                        async for chunk in resp.aiter_raw():
                            yield chunk
                    finally:
                        await resp.aclose()

                return StreamingResponse(chunks(), status_code=resp.status_code, headers=headers,
                                         media_type=resp.headers.get("content-type", "text/event-stream"))
            resp = await http().post(url, json=body, headers=send)
        except httpx.HTTPError as e:
            return _error(502, f"upstream {url} failed: {type(e).__name__}: {e}", "upstream_error")
        return Response(resp.content, status_code=resp.status_code, headers=headers,
                        media_type=resp.headers.get("content-type", "application/json"))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(request, "chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "completions")

    return app
