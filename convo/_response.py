"""Turning an API response into a stored assistant turn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._content import normalize_content
from ._message import Status
from .errors import InvalidInput

if TYPE_CHECKING:
    from ._store import ConversationStore, Turn


def _field(response: Any, name: str) -> Any:
    if isinstance(response, Mapping):
        return response.get(name)
    return getattr(response, name, None)


def usage_dict(usage: Any) -> dict[str, Any] | None:
    """The ``usage`` object as the API reported it, as a plain dict."""
    if usage is None:
        return None
    if isinstance(usage, Mapping):
        return dict(usage)
    dumped = usage.model_dump(mode="json", exclude_unset=True)
    return dumped if isinstance(dumped, dict) else None


def turn_from_response(
    store: ConversationStore,
    response: Any,
    *,
    latency_ms: int | None = None,
    status: Status = "complete",
) -> Turn:
    """The assistant turn for ``response`` (an SDK ``Message`` or a dict of its shape)."""
    from ._store import Turn

    role = _field(response, "role")
    if role not in (None, "assistant"):
        raise InvalidInput("response.role", f"must be 'assistant', not {role!r}")
    content = _field(response, "content")
    if content is None:
        raise InvalidInput("response.content", "is missing: is this a Messages API response?")
    # A reply can be empty (e.g. it stopped at once): stored as it came.
    blocks = store.for_storage(normalize_content(content)) if len(content) else []
    request_id = (
        response.get("_request_id") or response.get("request_id")
        if isinstance(response, Mapping)
        else getattr(response, "_request_id", None)
    )
    return Turn(
        role="assistant",
        content=blocks,
        token_count=store.count(blocks),
        status=status,
        model=_field(response, "model"),
        stop_reason=_field(response, "stop_reason"),
        usage=usage_dict(_field(response, "usage")),
        request_id=request_id,
        latency_ms=latency_ms,
    )
