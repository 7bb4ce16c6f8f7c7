"""The embedded SQLite file, read without SQLAlchemy: where it lives, whether it
is convo's, and the conversation list (the fast path of ``convo list``).

Importing SQLAlchemy's engine and ORM and convo's core costs a command about
300 ms; listing the conversations of a SQLite file at the current schema needs
none of it. :func:`list_conversations` reads such a file with the standard
library (read-only) and answers None whenever anything is unusual (another URL
form, a server database, a file to create or upgrade, any SQLite error): the
caller then opens a :class:`~convo.ConversationStore`, which handles it and
reports any error in full.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import platformdirs

from ._budget import default_model
from ._schema import TABLE_PREFIX, VERSION_TABLE, shipped_head
from .errors import ConvoError, DatabaseUnavailable, NotAConvoDatabase

__all__ = [
    "ENV_DATABASE_URL",
    "Listed",
    "default_database_path",
    "inspect_sqlite_file",
    "list_conversations",
]

ENV_DATABASE_URL: Final = "CONVO_DATABASE_URL"
_SQLITE: Final = "sqlite:///"
#: Newest first by id (ids are ULIDs: creation order), as ``ConversationStore.list``.
_LIST_SQL: Final = (
    "SELECT id, title, user_id, model, last_seq, created_at, updated_at, metadata "
    "FROM convo_conversations {where} ORDER BY id DESC LIMIT ?"
)


def default_database_path() -> Path:
    """The embedded SQLite file: ``convo.db`` in the user data directory."""
    return platformdirs.user_data_path("convo", appauthor=False) / "convo.db"


def inspect_sqlite_file(path: Path, *, allow_other_tables: bool = False) -> bool:
    """Check a SQLite file without changing it. True if it already has convo's schema.

    A file that does not exist or is empty is fine (False). A file that is not
    a SQLite database raises :class:`NotAConvoDatabase`, and so does one that
    holds tables of something other than convo unless ``allow_other_tables``;
    it is opened read-only and left as it was.
    """
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb") as handle:
        header = handle.read(16)
    if header != b"SQLite format 3\x00":
        raise NotAConvoDatabase(f"{path} is not a SQLite database; it was left untouched")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = {
                row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        for place, access in ((path, os.R_OK | os.W_OK), (path.parent, os.W_OK)):
            if not os.access(place, access):
                # Not the file's fault: SQLite could not open it here (a read-only file
                # system or missing permissions; WAL mode writes beside the file).
                raise DatabaseUnavailable(
                    f"cannot use the SQLite database {path}: {place} is not writable "
                    f"(read-only file system or permissions); SQLite said: {exc}"
                ) from None
        raise NotAConvoDatabase(
            f"{path} cannot be read as a SQLite database ({exc}); it was left untouched"
        ) from None
    if VERSION_TABLE in names:
        return True
    foreign = sorted(name for name in names if not name.startswith(TABLE_PREFIX))
    if foreign and not allow_other_tables:
        raise NotAConvoDatabase(
            f"{path} is not a convo database (it has tables {', '.join(foreign[:5])}); it was "
            "left untouched. Add convo's tables to it on purpose with "
            f"`convo db upgrade --db sqlite:///{path}`"
        )
    return False


@dataclass(frozen=True, slots=True)
class Listed:
    """A conversation as ``convo list`` shows it (the attributes of a ``Conversation``)."""

    id: str
    title: str | None
    user_id: str | None
    model: str | None
    message_count: int
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any]

    @property
    def effective_model(self) -> str:
        """The model its requests use: its own, else the default (as a store opened
        without ``model=`` has it)."""
        return self.model or default_model()


def plain_sqlite_path(url: str | None) -> Path | None:
    """The file of a plain ``sqlite:///path`` URL (the default when None); None for any
    other URL, or one with options, which only SQLAlchemy reads right."""
    if url is None:
        url = os.environ.get(ENV_DATABASE_URL) or None
        if url is None:
            return default_database_path()
    if not url.startswith(_SQLITE) or "?" in url or "%" in url:
        return None
    database = url[len(_SQLITE) :]
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def list_conversations(url: str | None, *, user_id: str | None, limit: int) -> list[Listed] | None:
    """The newest ``limit`` conversations (of ``user_id``) of a SQLite file at the
    current schema, read-only; None if the store should answer instead."""
    path = plain_sqlite_path(url)
    if path is None:
        return None
    try:
        if not inspect_sqlite_file(path):
            return None  # nothing there yet: the store creates it
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60.0)
        try:
            revisions = con.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
            if [row[0] for row in revisions] != [shipped_head()]:
                return None  # to upgrade (or newer than this convo): the store says so
            where, params = ("WHERE user_id = ?", (user_id, limit)) if user_id else ("", (limit,))
            rows = con.execute(_LIST_SQL.format(where=where), params).fetchall()
        finally:
            con.close()
        return [_listed(row) for row in rows]
    except (ConvoError, sqlite3.Error, ValueError, TypeError, OSError):
        return None


def _listed(row: tuple[Any, ...]) -> Listed:
    conversation_id, title, user_id, model, last_seq, created, updated, metadata = row
    return Listed(
        id=conversation_id,
        title=title,
        user_id=user_id,
        model=model,
        message_count=int(last_seq),
        created_at=_utc(created),
        updated_at=_utc(updated),
        metadata=(json.loads(metadata) if metadata else None) or {},
    )


def _utc(stored: str) -> datetime:
    """A datetime as SQLAlchemy stores it in SQLite (naive UTC ISO text)."""
    moment = datetime.fromisoformat(stored)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
