"""A turn as it is stored: checked, redacted and counted; the checks on a conversation's fields.

:class:`Turn` is the data; :class:`TurnMaker` turns what a caller gives into
one (content checked, redacted when ``redact_storage`` is on, counted), and
makes requests and summarizer input as they leave (``redact_requests``).
The store holds one; nothing here runs SQL.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from ._bridge import off_loop, rough_size
from ._content import (
    Block,
    check_placement,
    check_unicode,
    normalize_content,
    validate_role,
)
from ._message import Message, Status
from ._redaction import Redactor
from ._summarizer import SummaryTurn
from ._tokens import CachingCounter, TokenCounter, count_turn
from ._validate import check_count, json_copy
from .errors import InvalidInput, MessageTooLarge

if TYPE_CHECKING:
    from ._database import Database

__all__ = ["AlreadyAnswered", "Turn", "TurnMaker", "check_key", "reply_key"]

#: Room left in MySQL's packet for the rest of an INSERT besides the content.
STATEMENT_MARGIN: Final = 64 * 1024


def check_system(system: object) -> Any:
    if system is None:
        return None
    if isinstance(system, str):
        check_unicode("system", system, InvalidInput)
        return system
    if isinstance(system, list) and all(
        isinstance(block, Mapping) and block.get("type") == "text" for block in system
    ):
        blocks = [dict(block) for block in system]
        check_unicode("system", json.dumps(blocks, ensure_ascii=False), InvalidInput)
        return blocks
    raise InvalidInput("system", "must be a string or a list of text blocks")


def check_positive(field: str, value: object) -> int | None:
    return None if value is None else check_count(field, value)


def check_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput("metadata", "must be a dict with string keys")
    copied: dict[str, Any] = json_copy(dict(metadata), "metadata")
    if "\\u0000" in json.dumps(copied):  # PostgreSQL's JSONB cannot hold it
        raise InvalidInput("metadata", "must not contain NUL characters")
    check_unicode("metadata", json.dumps(copied, ensure_ascii=False), InvalidInput)
    return copied


def check_text(field: str, value: object, max_length: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, not {type(value).__name__}")
    if len(value) > max_length:
        raise InvalidInput(field, f"must be at most {max_length} characters")
    if "\x00" in value:
        raise InvalidInput(field, "must not contain NUL characters")
    check_unicode(field, value, InvalidInput)
    return value


#: Longest idempotency key (the column holds 128: room for the reply's suffix).
MAX_KEY_LENGTH: Final = 100


def check_key(key: object) -> str | None:
    """An idempotency key as given, checked."""
    if key is None:
        return None
    checked = check_text("key", key, MAX_KEY_LENGTH)
    if not checked:
        raise InvalidInput("key", "must not be empty")
    if checked.endswith(":reply"):
        raise InvalidInput("key", "must not end with ':reply' (convo keys replies that way)")
    return checked


class AlreadyAnswered(Exception):
    """A send's idempotency key already has its reply stored: ``message``."""

    def __init__(self, message: Message) -> None:
        super().__init__(message.seq)
        self.message = message


def reply_key(key: str) -> str:
    """The idempotency key of the reply to the user turn stored with ``key``."""
    return f"{key}:reply"


#: The columns of a turn's row, as ``Message`` attributes of the same names.
MESSAGE_COLUMNS: Final = (
    "conversation_id",
    "seq",
    "role",
    "content",
    "token_count",
    "status",
    "model",
    "stop_reason",
    "usage",
    "request_id",
    "latency_ms",
    "created_at",
)


@dataclass(frozen=True, slots=True)
class Turn:
    """A turn checked and counted, ready to be appended."""

    role: str
    content: list[Block]
    token_count: int
    status: Status = "complete"
    model: str | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None
    request_id: str | None = None
    latency_ms: int | None = None
    key: str | None = None

    def as_message(self, conversation_id: str, seq: int, created_at: datetime) -> Message:
        """The turn as a :class:`Message` numbered ``seq`` (0: not stored)."""
        fields = {name: getattr(self, name) for name in _MESSAGE_FIELDS}
        return Message(conversation_id=conversation_id, seq=seq, created_at=created_at, **fields)


#: The fields a Turn and a Message share: a row's columns less where and when it was stored.
_MESSAGE_FIELDS: Final = tuple(
    c for c in MESSAGE_COLUMNS if c not in ("conversation_id", "seq", "created_at")
)


class TurnMaker:
    """Makes :class:`Turn` s and outgoing requests under a store's counting and redaction."""

    def __init__(
        self,
        database: Database,
        token_counter: TokenCounter,
        *,
        storage_redactor: Redactor | None,
        request_redactor: Redactor | None,
    ) -> None:
        self._db = database
        self.token_counter = token_counter
        #: The same counts, remembered for the texts counted on every request.
        self.cached_counter = CachingCounter(token_counter)
        self.storage_redactor = storage_redactor
        self.request_redactor = request_redactor

    def count(self, blocks: Sequence[Block]) -> int:
        """Raw tokens one turn with these blocks adds to a request (a long turn off the loop)."""
        return off_loop(count_turn, rough_size(blocks), self.token_counter, blocks)

    def count_text(self, text: str) -> int:
        """Raw tokens of a text (system prompts and summaries; cached)."""
        return self.cached_counter.count(text)

    def make_turn(self, role: object, content: object, **fields: Any) -> Turn:
        """Check, redact (``redact_storage``) and count a turn for storing.

        :class:`InvalidMessage` names what is wrong.
        """
        checked_role = validate_role(role)
        normalized = normalize_content(content)
        check_placement(checked_role, normalized)
        blocks = self.for_storage(normalized)
        self._check_storable(blocks)
        return Turn(checked_role, blocks, self.count(blocks), **fields)

    def _check_storable(self, blocks: builtins.list[Block]) -> None:
        """Refuse a turn the database would drop the connection over (MySQL's packet limit)."""
        limit = self._db.max_statement_bytes()
        if limit is None:
            return
        size = len(json.dumps(blocks, ensure_ascii=False).encode())
        if size > limit - STATEMENT_MARGIN:
            raise MessageTooLarge(
                "content",
                f"is {size:,} bytes as JSON; this MySQL/MariaDB server takes at most "
                f"{limit:,} bytes in one statement (max_allowed_packet); raise that setting "
                "on the server to store it. Nothing was stored",
            )

    def for_storage(self, blocks: builtins.list[Block]) -> builtins.list[Block]:
        """Blocks as they are stored: redacted if ``redact_storage`` is on."""
        redactor = self.storage_redactor
        return blocks if redactor is None else redactor.redact_blocks(blocks)

    def redacted_for_summary(self, turn: SummaryTurn) -> SummaryTurn:
        """A turn as a summarizer may see it: redacted if ``redact_requests`` is on."""
        redactor = self.request_redactor
        if redactor is None:
            return turn
        return SummaryTurn(turn.seq, turn.role, redactor.redact_blocks(turn.content))

    def outbound(self, params: dict[str, Any]) -> dict[str, Any]:
        """The request as it leaves: redacted if ``redact_requests`` is on."""
        redactor = self.request_redactor
        if redactor is None:
            return params
        redacted = dict(params)
        redacted["messages"] = [
            {**m, "content": redactor.redact_blocks(m["content"])} for m in params["messages"]
        ]
        if "system" in params:
            redacted["system"] = redactor.redact_system(params["system"])
        return redacted

    def conversation_columns(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        """Checked conversation attributes as stored: column name -> value.

        Free text (system prompt, title, metadata) is redacted when
        ``redact_storage`` is on, like every turn. ``user_id`` and ``model``
        are identifiers and are kept as given.
        """
        redactor = self.storage_redactor
        columns: dict[str, Any] = {}
        for name, value in attributes.items():
            if name == "user_id":
                columns["user_id"] = check_text("user_id", value, 255)
            elif name == "model":
                columns["model"] = check_text("model", value, 100)
            elif name == "token_budget":
                columns["token_budget"] = check_positive("token_budget", value)
            elif name == "title":
                title = check_text("title", value, 500)
                columns["title"] = redactor.redact_text(title) if redactor and title else title
            elif name == "system":
                system = check_system(value)
                columns["system"] = redactor.redact_system(system) if redactor else system
            elif name == "metadata":
                metadata = check_metadata(value)
                columns["metadata_"] = redactor.redact_json(metadata) if redactor else metadata
            else:
                raise InvalidInput(name, "is not an attribute of a conversation")
        return columns
