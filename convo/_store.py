"""``ConversationStore`` and ``Conversation``: conversations and their turns in SQL.

Appending a turn locks the conversation's row (``SELECT ... FOR UPDATE`` on
PostgreSQL and MySQL, the write lock on SQLite), numbers the turn
``last_seq + 1`` and commits both in one transaction: any number of threads,
processes and hosts can append to one conversation and every turn is stored
once, numbered without gaps.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import URL, delete, select
from sqlalchemy.orm import Session

from . import _migrations
from ._content import normalize_content, validate_role
from ._database import Database, mask, resolve_url
from ._ids import is_conversation_id, new_conversation_id
from ._message import Message, Status
from ._models import ConversationRow, MessageRow, utcnow
from ._tokens import TiktokenCounter, TokenCounter, count_turn
from .errors import ConversationNotFound, InvalidInput

__all__ = ["Conversation", "ConversationStore"]

ENV_MODEL: Final = "CONVO_MODEL"
DEFAULT_LIST_LIMIT: Final = 50
#: Rows fetched per round trip when reading a long history.
HISTORY_BATCH: Final = 1_000


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


def _check_system(system: object) -> Any:
    if system is None or isinstance(system, str):
        return system
    if isinstance(system, list) and all(
        isinstance(block, Mapping) and block.get("type") == "text" for block in system
    ):
        return [dict(block) for block in system]
    raise InvalidInput("system", "must be a string or a list of text blocks")


def _check_budget(token_budget: object) -> int | None:
    if token_budget is None:
        return None
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget <= 0:
        raise InvalidInput("token_budget", f"must be a positive integer, not {token_budget!r}")
    return token_budget


def _check_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput("metadata", "must be a dict with string keys")
    import json

    try:
        copied: dict[str, Any] = json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("metadata", f"is not JSON-serialisable: {exc}") from None
    return copied


def _check_text(field: str, value: object, max_length: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a string, not {type(value).__name__}")
    if len(value) > max_length:
        raise InvalidInput(field, f"must be at most {max_length} characters")
    return value


def _message(row: MessageRow) -> Message:
    return Message(
        conversation_id=row.conversation_id,
        seq=row.seq,
        role=validate_role(row.role),
        content=row.content,
        token_count=row.token_count,
        created_at=row.created_at,
        status=row.status,  # type: ignore[arg-type]
        model=row.model,
        stop_reason=row.stop_reason,
        usage=row.usage,
        request_id=row.request_id,
        latency_ms=row.latency_ms,
    )


@dataclass(frozen=True, slots=True)
class _Turn:
    """A turn checked and counted, ready to be appended."""

    role: str
    content: list[dict[str, Any]]
    token_count: int
    status: Status = "complete"
    model: str | None = None
    stop_reason: str | None = None
    usage: dict[str, Any] | None = None
    request_id: str | None = None
    latency_ms: int | None = None


class ConversationStore:
    """Conversations and their turns, persisted in a SQL database.

    ``url`` is a SQLAlchemy database URL; ``None`` means ``CONVO_DATABASE_URL``,
    then a SQLite file in the user data directory. A SQLite database is
    created or upgraded on first use; a server database must be upgraded with
    ``convo db upgrade`` (the store says so if it is behind).
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        token_counter: TokenCounter | None = None,
        model: str | None = None,
        token_budget: int | None = None,
        echo: bool = False,
    ) -> None:
        self._url = resolve_url(url)
        self.token_counter: TokenCounter = token_counter or TiktokenCounter()
        self.model: str | None = model or os.environ.get(ENV_MODEL) or None
        self.token_budget = _check_budget(token_budget)
        self._db = Database(self._url, echo=echo)
        try:
            self._ensure_schema()
        except BaseException:
            self._db.close()
            raise

    def _ensure_schema(self) -> None:
        with self._db.transaction() as session:
            revision = _migrations.schema_revision(session.connection())
        if revision == _migrations.head_revision():
            return
        # Only the embedded database upgrades itself, and only from a revision
        # this convo knows; a server database is upgraded on purpose.
        if self._db.dialect != "sqlite" or (
            revision is not None and revision not in _migrations.known_revisions()
        ):
            raise _migrations.out_of_date(self._url, revision)
        _migrations.upgrade(self._db)

    # -- the store ---------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL, with any password masked."""
        return mask(self._url)

    @property
    def database(self) -> Database:
        return self._db

    def close(self) -> None:
        """Release the store's database connections."""
        self._db.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConversationStore({self.url!r})"

    def create(
        self,
        *,
        model: str | None = None,
        system: str | builtins.list[dict[str, Any]] | None = None,
        token_budget: int | None = None,
        title: str | None = None,
        user_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Conversation:
        """Start a conversation and return it. Nothing is sent to the API."""
        now = utcnow()
        row = ConversationRow(
            id=new_conversation_id(),
            user_id=_check_text("user_id", user_id, 255),
            title=_check_text("title", title, 500),
            model=_check_text("model", model, 100),
            system=_check_system(system),
            token_budget=_check_budget(token_budget),
            metadata_=_check_metadata(metadata),
            last_seq=0,
            created_at=now,
            updated_at=now,
        )
        with self._db.transaction(write=True) as session:
            session.add(row)
        return Conversation(self, row)

    def get(self, conversation_id: str) -> Conversation:
        """The conversation with this id; :class:`ConversationNotFound` if there is none."""
        with self._db.transaction() as session:
            return Conversation(self, self._row(session, conversation_id))

    def list(
        self,
        *,
        user_id: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        before: str | None = None,
    ) -> builtins.list[Conversation]:
        """Conversations, newest first (optionally one user's).

        ``before`` is a conversation id: pass the last id of a page to get the
        next one.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise InvalidInput("limit", f"must be a positive integer, not {limit!r}")
        query = select(ConversationRow).order_by(ConversationRow.id.desc()).limit(limit)
        if user_id is not None:
            query = query.where(ConversationRow.user_id == user_id)
        if before is not None:
            query = query.where(ConversationRow.id < before)
        with self._db.transaction() as session:
            return [Conversation(self, row) for row in session.scalars(query)]

    def delete(self, conversation_id: str) -> None:
        """Delete a conversation and all its turns."""
        with self._db.transaction(write=True) as session:
            self._row(session, conversation_id, lock=True)
            session.execute(delete(MessageRow).where(MessageRow.conversation_id == conversation_id))
            session.execute(delete(ConversationRow).where(ConversationRow.id == conversation_id))

    # -- used by Conversation ------------------------------------------------

    @staticmethod
    def _row(session: Session, conversation_id: str, *, lock: bool = False) -> ConversationRow:
        if not is_conversation_id(conversation_id):
            raise ConversationNotFound(str(conversation_id))
        query = select(ConversationRow).where(ConversationRow.id == conversation_id)
        if lock:
            query = query.with_for_update()
        row = session.scalars(query.execution_options(populate_existing=True)).one_or_none()
        if row is None:
            raise ConversationNotFound(conversation_id)
        return row

    def _turn(self, role: object, content: object, **fields: Any) -> _Turn:
        checked_role = validate_role(role)
        blocks = normalize_content(content)
        return _Turn(checked_role, blocks, count_turn(self.token_counter, blocks), **fields)

    def _append(self, conversation_id: str, turn: _Turn) -> tuple[Message, ConversationRow]:
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            now = utcnow()
            conversation.last_seq += 1
            conversation.updated_at = now
            row = MessageRow(
                conversation_id=conversation_id,
                seq=conversation.last_seq,
                role=turn.role,
                content=turn.content,
                token_count=turn.token_count,
                status=turn.status,
                model=turn.model,
                stop_reason=turn.stop_reason,
                usage=turn.usage,
                request_id=turn.request_id,
                latency_ms=turn.latency_ms,
                created_at=now,
            )
            session.add(row)
            session.flush()
            return _message(row), conversation

    def _history(self, conversation_id: str, *, since_seq: int = 0) -> Iterator[Message]:
        query = (
            select(MessageRow)
            .where(MessageRow.conversation_id == conversation_id, MessageRow.seq > since_seq)
            .order_by(MessageRow.seq)
            .execution_options(yield_per=HISTORY_BATCH)
        )
        with self._db.transaction() as session:
            self._row(session, conversation_id)
            for row in session.scalars(query):
                yield _message(row)

    def _update(self, conversation_id: str, changes: dict[str, Any]) -> ConversationRow:
        with self._db.transaction(write=True) as session:
            row = self._row(session, conversation_id, lock=True)
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            return row


class Conversation:
    """A stored conversation. Get one with ``store.create()`` or ``store.get(id)``.

    Its attributes are a snapshot taken when it was loaded (``refresh()``
    reloads them); its turns are always read from the database, so another
    process may append to the same conversation at the same time.
    """

    def __init__(self, store: ConversationStore, row: ConversationRow) -> None:
        self.store = store
        self._load(row)

    def _load(self, row: ConversationRow) -> None:
        self.id: str = row.id
        self.user_id: str | None = row.user_id
        self.title: str | None = row.title
        self.model: str | None = row.model
        self.system: str | list[dict[str, Any]] | None = row.system
        self.token_budget: int | None = row.token_budget
        self.metadata: dict[str, Any] = dict(row.metadata_ or {})
        self.created_at: datetime = row.created_at
        self.updated_at: datetime = row.updated_at
        self.message_count: int = row.last_seq

    def __repr__(self) -> str:
        return f"<Conversation {self.id} messages={self.message_count} title={self.title!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Conversation) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def refresh(self) -> Conversation:
        """Reload the attributes from the database."""
        with self.store.database.transaction() as session:
            self._load(self.store._row(session, self.id))
        return self

    def add(self, role: str, content: str | list[Any]) -> Message:
        """Append a turn without calling the API and return it as stored.

        ``content`` is a string or a list of Messages API content blocks (dicts
        or SDK objects). Raises :class:`InvalidMessage` naming the bad field;
        nothing is written then.
        """
        message, row = self.store._append(self.id, self.store._turn(role, content))
        self._load(row)
        return message

    def history(self) -> list[Message]:
        """Every turn of the conversation, in order."""
        return list(self.store._history(self.id))

    def iter_history(self) -> Iterator[Message]:
        """Every turn, in order, read in batches: for very long conversations."""
        return self.store._history(self.id)

    def update(
        self,
        *,
        title: str | _Unset | None = UNSET,
        metadata: Mapping[str, Any] | _Unset | None = UNSET,
        model: str | _Unset | None = UNSET,
        system: str | list[dict[str, Any]] | _Unset | None = UNSET,
        token_budget: int | _Unset | None = UNSET,
    ) -> Conversation:
        """Change the given attributes (``metadata`` is replaced whole)."""
        changes: dict[str, Any] = {}
        if not isinstance(title, _Unset):
            changes["title"] = _check_text("title", title, 500)
        if not isinstance(metadata, _Unset):
            changes["metadata_"] = _check_metadata(metadata)
        if not isinstance(model, _Unset):
            changes["model"] = _check_text("model", model, 100)
        if not isinstance(system, _Unset):
            changes["system"] = _check_system(system)
        if not isinstance(token_budget, _Unset):
            changes["token_budget"] = _check_budget(token_budget)
        if changes:
            self._load(self.store._update(self.id, changes))
        return self
