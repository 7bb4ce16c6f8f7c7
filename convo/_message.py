"""``Message``: one stored turn of a conversation, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from ._content import Block, text_of

Status = Literal["complete", "incomplete", "failed", "excluded"]


@dataclass(frozen=True, slots=True)
class Message:
    """A turn as stored: its place (``seq``), its role and its content blocks.

    Assistant turns written from an API response also carry what the API
    reported: ``model``, ``stop_reason``, ``usage``, ``request_id`` and the
    call's ``latency_ms``.

    ``status`` is ``"complete"``; ``"incomplete"`` for a reply cut off
    mid-stream (its partial text is kept); ``"failed"`` for a user turn whose
    API call failed (it is sent again with the next turn); ``"excluded"`` for a
    turn left out of every request with ``conv.exclude(seq)`` (still stored).
    """

    conversation_id: str
    seq: int
    role: Literal["user", "assistant"]
    content: list[Block]
    token_count: int
    created_at: datetime
    status: Status = "complete"
    model: str | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] | None = field(default=None)
    request_id: str | None = None
    latency_ms: int | None = None

    @property
    def text(self) -> str:
        """The text of the turn's text blocks, joined."""
        return text_of(self.content)

    @property
    def truncated(self) -> bool:
        """True if the reply stopped because it reached ``max_tokens``."""
        return self.stop_reason == "max_tokens"

    def to_param(self) -> dict[str, Any]:
        """The turn as a ``MessageParam`` dict for the Messages API."""
        return {"role": self.role, "content": self.content}
