"""What the skill router reads from an OpenAI-compatible request: whether it asks to be routed, and the text the
gate routes on. Shared by :mod:`loramix.skills.serve` and its HTTP proxy (:mod:`loramix.skills.proxy`)."""

from __future__ import annotations

from typing import Any

from .library import SkillLibraryError

ROUTE_MODEL = "auto"
"""The ``model`` value that asks the proxy to route (a missing ``model`` routes too)."""


def prompt_from_messages(messages: Any) -> str:
    """The text the gate routes on: the user turns after the last assistant turn, joined by newlines.

    ``content`` may be a string or a list of parts (``{"type": "text", "text": ...}``; other parts ignored).
    """
    if not isinstance(messages, list) or not messages:
        raise SkillLibraryError("'messages' must be a non-empty list of {role, content} objects")
    users: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise SkillLibraryError(f"messages[{i}] must be an object with a 'role'")
        if m["role"] == "assistant":
            users = []
        elif m["role"] == "user":
            text = _content_text(m.get("content"), i)
            if text:
                users.append(text)
    text = "\n".join(users)
    if not text.strip():
        raise SkillLibraryError("the request has no user text to route on (no user message after the last "
                                "assistant message)")
    return text


def _content_text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise SkillLibraryError(f"messages[{i}].content must be a string or a list of parts")
