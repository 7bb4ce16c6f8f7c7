"""The database schema: SQLAlchemy 2.0 typed models, one ``Base``.

Every table is prefixed ``convo_`` (and Alembic's version table is
``convo_alembic_version``) so convo can share a database with the
application that uses it.

Dialect differences are settled here, once:

* ``UTCDateTime``: timezone-aware UTC datetimes everywhere (``timestamptz`` on
  PostgreSQL, microsecond ``DATETIME(6)`` on MySQL/MariaDB, ISO text on SQLite).
* ``BigID``: 64-bit keys, plain ``INTEGER`` on SQLite so that it is the rowid.
* ``Document``: queryable ``JSONB`` on PostgreSQL for metadata.
* ``LongText``: ``LONGTEXT`` on MySQL/MariaDB, whose ``TEXT`` holds only 64 KiB.
* ``Content``: message content as ``json`` (not ``JSONB``) on PostgreSQL, which
  keeps the text exactly as written: key order is part of a prompt-cache prefix
  and history must come back as it went in.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION: Final = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every database, whatever it stores natively."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where a UTC datetime is stored")
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


BigID = BigInteger().with_variant(Integer(), "sqlite")
Document = JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
Content = JSON(none_as_null=True)
#: Long text: MySQL's TEXT stops at 64 KiB.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
SearchText = Text().with_variant(mysql.LONGTEXT(collation="utf8mb4_unicode_ci"), "mysql", "mariadb")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


_TABLE_OPTIONS: Final = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


class ConversationRow(Base):
    __tablename__ = "convo_conversations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(255))
    title: Mapped[str | None] = mapped_column(String(500))
    model: Mapped[str | None] = mapped_column(String(100))
    #: A string, or a list of text blocks (as the API's ``system`` parameter).
    system: Mapped[Any | None] = mapped_column(Content)
    token_budget: Mapped[int | None] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", Document)
    #: The seq of the newest message; 0 while there is none. Appends lock this row.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    #: Turns up to this seq are archived (and summarized); the live window follows.
    archived_through_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: While compaction lags behind, requests start at this seq (a safe start)
    #: and the live turns before it are stored but not sent. It moves only
    #: when the window overflows, so consecutive requests share their prefix.
    window_start_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Consecutive failures of the summarizer, and when it may be tried again.
    compaction_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    compaction_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: A send/stream in flight claims the conversation until then (or until it ends).
    busy_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    busy_owner: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        # "A user's conversations, newest first": ids sort by creation time.
        Index("ix_convo_conversations_user_id_id", "user_id", "id"),
        _TABLE_OPTIONS,
    )


class MessageRow(Base):
    __tablename__ = "convo_messages"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("convo_conversations.id", ondelete="CASCADE")
    )
    #: 1, 2, 3, ... within a conversation: unique and gap-free.
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    #: Messages API content blocks; NULL once the turn is archived (its content
    #: is then in the archive block that covers its seq).
    content: Mapped[list[dict[str, Any]] | None] = mapped_column(Content)
    #: Input tokens this turn adds to a request, by the store's counter.
    token_count: Mapped[int] = mapped_column(Integer)
    #: "complete", or "incomplete" (a cut-off reply), or "failed" (a user turn
    #: whose API call failed).
    status: Mapped[str] = mapped_column(String(16), default="complete")
    model: Mapped[str | None] = mapped_column(String(100))
    stop_reason: Mapped[str | None] = mapped_column(String(64))
    #: The ``usage`` object of the API response, as reported.
    usage: Mapped[dict[str, Any] | None] = mapped_column(Document)
    request_id: Mapped[str | None] = mapped_column(String(128))
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The caller's idempotency key (``add(..., key=)``, ``send(..., key=)``): a
    #: retry with the same key finds this turn instead of storing another.
    key: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        # Also the index behind "the newest K messages of a conversation".
        UniqueConstraint("conversation_id", "seq"),
        UniqueConstraint("conversation_id", "key"),
        _TABLE_OPTIONS,
    )


class ArchiveBlockRow(Base):
    """Consecutive archived turns, zlib-compressed and base64-encoded, with a checksum."""

    __tablename__ = "convo_archive_blocks"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("convo_conversations.id", ondelete="CASCADE")
    )
    first_seq: Mapped[int] = mapped_column(Integer)
    last_seq: Mapped[int] = mapped_column(Integer)
    #: base64(zlib(JSON of the turns)).
    payload: Mapped[str] = mapped_column(LongText)
    #: SHA-256 (hex) of the JSON before compression.
    checksum: Mapped[str] = mapped_column(String(64))
    #: Size of the JSON before compression, in bytes.
    raw_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("conversation_id", "first_seq"), _TABLE_OPTIONS)


class SummaryRow(Base):
    """A rolling summary of a conversation's turns 1..through_seq."""

    __tablename__ = "convo_summaries"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("convo_conversations.id", ondelete="CASCADE")
    )
    through_seq: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(LongText)
    token_count: Mapped[int] = mapped_column(Integer)
    #: "claude", "extractive" or "custom".
    summarizer: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(100))
    usage: Mapped[dict[str, Any] | None] = mapped_column(Document)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("conversation_id", "through_seq"), _TABLE_OPTIONS)


class CalibrationRow(Base):
    """The token-count correction factor of one model, learned from API usage."""

    __tablename__ = "convo_calibration"

    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    factor: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (_TABLE_OPTIONS,)


class SearchTextRow(Base):
    """The searchable text of one turn, indexed by the database's full-text search.

    Kept when the turn is archived, so search covers the whole history. The
    full-text indexes are dialect-specific and made by migrations 0004 (exact
    search: an FTS5 table on SQLite, a GIN ``tsvector`` index on PostgreSQL, a
    ``FULLTEXT`` index on MySQL/MariaDB) and 0005 (ranked recall: an FTS5
    table with the porter tokenizer on SQLite; on PostgreSQL a stored
    generated ``tsvector`` column ``convo_search_fts_english`` with a GIN
    index). Being named ``convo_search_fts*``, they are outside the models.
    """

    __tablename__ = "convo_search"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("convo_conversations.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    #: Case-insensitive on MySQL/MariaDB, whose FULLTEXT follows the column's collation.
    text: Mapped[str] = mapped_column(SearchText)

    __table_args__ = (UniqueConstraint("conversation_id", "seq"), _TABLE_OPTIONS)
