"""Turning an API response into a stored assistant turn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ._content import normalize_content
from ._message import Status
from .errors import InvalidInput

if TYPE_CHECKING:
    from ._store import ConversationStore
    from ._turns import Turn


def _field(response: Any, name: str) -> Any:
    if isinstance(response, Mapping):
        return response.get(name)
    return getattr(response, name, None)


#: The documented ``usage`` fields convo stores (nested ones with their documented keys).
USAGE_FIELDS: Final[dict[str, tuple[str, ...] | None]] = {
    "input_tokens": None,
    "output_tokens": None,
    "cache_creation_input_tokens": None,
    "cache_read_input_tokens": None,
    "cache_creation": ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"),
    "server_tool_use": ("web_search_requests", "web_fetch_requests"),
    "service_tier": None,
}


def usage_dict(usage: Any) -> dict[str, Any] | None:
    """The documented fields of the ``usage`` the API reported, as a plain dict.

    Other keys (SDK- or deployment-specific ones such as ``inference_geo`` or
    ``speed``) are not stored.
    """
    if usage is None:
        return None
    if not isinstance(usage, Mapping):
        usage = usage.model_dump(mode="json", exclude_unset=True)
        if not isinstance(usage, Mapping):
            return None
    kept: dict[str, Any] = {}
    for key, nested in USAGE_FIELDS.items():
        value = usage.get(key)
        if value is None:
            continue
        if nested is not None:
            if not isinstance(value, Mapping):
                continue
            value = {k: value[k] for k in nested if value.get(k) is not None}
        kept[key] = value
    return kept


def turn_from_response(
    store: ConversationStore,
    response: Any,
    *,
    latency_ms: int | None = None,
    status: Status = "complete",
    request_id: str | None = None,
) -> Turn:
    """The assistant turn for ``response`` (an SDK ``Message`` or a dict of its shape)."""
    from ._turns import Turn

    role = _field(response, "role")
    if role not in (None, "assistant"):
        raise InvalidInput("response.role", f"must be 'assistant', not {role!r}")
    content = _field(response, "content")
    if content is None:
        raise InvalidInput("response.content", "is missing: is this a Messages API response?")
    # A reply can be empty (e.g. it stopped at once): stored as it came.
    blocks = store.turns.for_storage(normalize_content(content)) if len(content) else []
    if request_id is None:
        request_id = (
            response.get("_request_id") or response.get("request_id")
            if isinstance(response, Mapping)
            else getattr(response, "_request_id", None)
        )
    return Turn(
        role="assistant",
        content=blocks,
        token_count=store.turns.count(blocks),
        status=status,
        model=_field(response, "model"),
        stop_reason=_field(response, "stop_reason"),
        usage=usage_dict(_field(response, "usage")),
        request_id=request_id,
        latency_ms=latency_ms,
    )
