"""Checking and normalising message content into Messages API content blocks.

Every stored turn holds a list of content blocks, exactly the shape the API
takes and returns. A plain string becomes one text block. SDK objects
(``anthropic.types.TextBlock`` and friends) are turned into the dicts the API
sent. Block types convo does not know pass through untouched, so server tool
blocks and ``compaction`` blocks round-trip.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from ._validate import json_copy
from .errors import InvalidInput, InvalidMessage

Role = Literal["user", "assistant"]
Block = dict[str, Any]

ROLES: Final = ("user", "assistant")


def validate_role(role: object) -> Role:
    if role not in ROLES:
        raise InvalidMessage("role", f"must be 'user' or 'assistant', not {role!r}")
    return role


def _to_dict(block: object, field: str) -> Block:
    """A plain dict for ``block``, which may be an SDK (pydantic) model."""
    if isinstance(block, Mapping):
        return dict(block)
    model_dump = getattr(block, "model_dump", None)
    if callable(model_dump):
        # Only the fields the API actually sent: what we store is what it returned.
        dumped = model_dump(mode="json", exclude_unset=True)
        if isinstance(dumped, dict):
            return dumped
    raise InvalidMessage(field, f"must be a content block (a dict), not {type(block).__name__}")


def _require_str(block: Block, key: str, field: str, *, non_blank: bool = False) -> None:
    value = block.get(key)
    if not isinstance(value, str):
        raise InvalidMessage(f"{field}.{key}", "is required and must be a string")
    if non_blank and not value.strip():
        raise InvalidMessage(f"{field}.{key}", "must contain non-whitespace text")


def _check_block(block: Block, field: str) -> None:
    kind = block.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidMessage(f"{field}.type", "every content block needs a 'type' string")
    if kind == "text":
        _require_str(block, "text", field, non_blank=True)
    elif kind == "tool_use":
        _require_str(block, "id", field, non_blank=True)
        _require_str(block, "name", field, non_blank=True)
        if not isinstance(block.get("input"), dict):
            raise InvalidMessage(f"{field}.input", "is required and must be an object")
    elif kind == "tool_result":
        _require_str(block, "tool_use_id", field, non_blank=True)
        content = block.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidMessage(f"{field}.content", "must be a string or a list of blocks")
        if isinstance(content, list):
            for index, inner in enumerate(content):
                inner_field = f"{field}.content[{index}]"
                if not isinstance(inner, Mapping):
                    raise InvalidMessage(inner_field, "must be a content block (a dict)")
                _check_block(dict(inner), inner_field)
    elif kind == "thinking":
        _require_str(block, "thinking", field)
        _require_str(block, "signature", field)
    elif kind == "redacted_thinking":
        _require_str(block, "data", field)
    # Other types (image, document, server tools, compaction, ...) are the API's
    # to judge; convo stores them as they are.


#: Block types only the assistant writes, and only the user.
_ASSISTANT_ONLY: Final = frozenset(
    {"tool_use", "server_tool_use", "thinking", "redacted_thinking", "mcp_tool_use"}
)
_USER_ONLY: Final = frozenset({"tool_result"})


def check_placement(role: str, blocks: list[Block]) -> None:
    """Reject blocks the API refuses in a turn of this role (every later request would fail)."""
    wrong = _ASSISTANT_ONLY if role == "user" else _USER_ONLY
    for index, block in enumerate(blocks):
        if block.get("type") in wrong:
            other = "assistant" if role == "user" else "user"
            raise InvalidMessage(
                f"content[{index}].type",
                f"a {block['type']} block cannot be in a {role!r} turn (only in {other!r} "
                "turns); the API would reject every later request",
            )


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (not valid UTF-8), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_unicode(field: str, text: str, error: type[InvalidInput] = InvalidMessage) -> None:
    """Reject text that cannot be stored or sent as UTF-8 (lone surrogates, bad input bytes)."""
    where = lone_surrogate(text)
    if where is not None:
        raise error(
            field,
            f"is not valid Unicode text: U+{ord(text[where]):04X} at character {where} is a "
            "lone surrogate (often undecodable bytes from a terminal or file)",
        )


def normalize_content(content: object) -> list[Block]:
    """Check ``content`` and return it as a fresh list of content blocks.

    Raises :class:`InvalidMessage` naming the offending field.
    """
    if isinstance(content, str):
        if not content.strip():
            raise InvalidMessage("content", "must contain non-whitespace text")
        check_unicode("content", content)
        return [{"type": "text", "text": content}]
    if isinstance(content, Mapping) or not isinstance(content, Iterable):
        raise InvalidMessage(
            "content", f"must be a string or a list of content blocks, not {type(content).__name__}"
        )
    blocks = [_to_dict(block, f"content[{i}]") for i, block in enumerate(content)]
    if not blocks:
        raise InvalidMessage("content", "must not be an empty list")
    for index, block in enumerate(blocks):
        _check_block(block, f"content[{index}]")
    # Stored as JSON: catch what cannot be (sets, bytes, NaN, runaway nesting) before
    # writing, and keep a deep copy so later changes to the caller's dicts change nothing.
    copied: list[Block] = json_copy(blocks, "content", error=InvalidMessage)
    if lone_surrogate(json.dumps(copied, ensure_ascii=False)) is not None:
        for index, block in enumerate(copied):
            check_unicode(f"content[{index}]", json.dumps(block, ensure_ascii=False))
    return copied


def text_of(blocks: Iterable[Block]) -> str:
    """The text of the text blocks, joined: what a person reads of a turn."""
    return "".join(block["text"] for block in blocks if block.get("type") == "text")
