"""``ConversationStore``: conversations, turns, archive blocks and summaries in SQL.

This is the database edge of convo: it reads what the context engine
(``_window``, ``_budget``) needs and writes what it decides.

Appending a turn locks the conversation's row (``SELECT ... FOR UPDATE`` on
PostgreSQL and MySQL, the write lock on SQLite), numbers the turn
``last_seq + 1`` and commits both in one transaction: any number of threads,
processes and hosts can append to one conversation and every turn is stored
once, numbered without gaps. Compaction takes the same lock to move turns
into an archive block, so it never races an append.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import URL, Text, cast, delete, func, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from . import _archive, _verify
from ._bridge import off_loop, rough_size
from ._budget import Calibration
from ._compaction import (
    CHUNK_BATCH,
    DEFAULT_SUMMARIZER_INPUT_TOKENS,
    MAX_BLOCK_BYTES,
    MAX_BLOCK_TURNS,
    TAIL_BATCH,
    Backoff,
)
from ._content import (
    Block,
    check_placement,
    check_unicode,
    normalize_content,
    validate_role,
)
from ._database import Database, mask, resolve_url
from ._heartbeat import Heartbeat, ThreadHeartbeat
from ._ids import PREFIX as ID_PREFIX
from ._ids import is_conversation_id, is_id_prefix, new_conversation_id
from ._message import Message, Status
from ._models import (
    ArchiveBlockRow,
    CalibrationRow,
    ConversationRow,
    MessageRow,
    SearchTextRow,
    SummaryRow,
    utcnow,
)
from ._outbox import Outbox, PendingReply, outbox_path
from ._pricing import PriceTable
from ._ratelimit import LimitedClient, RateLimiter
from ._recall import (
    DEFAULT_K,
    DEFAULT_RECALL,
    DEFAULT_SHARE,
    SCOPES,
    RecallHit,
    RecallQuery,
    query_terms,
)
from ._redaction import Redactor
from ._schema import shipped_head, stored_revision
from ._search import SearchHit, searchable_text
from ._search import recall as run_recall
from ._search import search as run_search
from ._summarizer import (
    ClaudeSummarizer,
    Summarizer,
    SummaryResult,
    SummaryTurn,
)
from ._tokens import CachingCounter, TiktokenCounter, TokenCounter, count_turn
from ._usage import GROUPINGS, CallRecord, GroupBy, UsageReport, summarize
from ._validate import check_count, check_duration, check_seconds, check_time, json_copy
from ._window import LiveTurn, SummaryPart, summary_block
from .errors import (
    ArchiveCorrupted,
    ConversationBusy,
    ConversationNotFound,
    DatabaseUnavailable,
    InvalidInput,
    MessageTooLarge,
    MissingAPIKey,
)

if TYPE_CHECKING:
    from ._conversation import Conversation

__all__ = ["ConversationStore"]

logger = logging.getLogger("convo")

ENV_MODEL: Final = "CONVO_MODEL"
#: A current, non-deprecated model from the SDK's list.
DEFAULT_MODEL: Final = "claude-sonnet-5-5"
DEFAULT_LIST_LIMIT: Final = 50
#: Candidates an ambiguous id prefix lists.
FIND_CANDIDATES: Final = 10
#: After a compaction the live turns use at most this share of the budget.
DEFAULT_LOW_WATER: Final = 0.55
#: How long a send's claim on a conversation outlives a crashed sender. While
#: the sender lives, a heartbeat renews the claim every third of this.
DEFAULT_SEND_LEASE: Final = 60.0
#: The smallest ``summarizer_input_tokens`` accepted.
MIN_SUMMARIZER_INPUT_TOKENS: Final = 2_000
#: Rows fetched per round trip when reading a long history.
HISTORY_BATCH: Final = 1_000
#: Room left in MySQL's packet for the rest of an INSERT besides the content.
STATEMENT_MARGIN: Final = 64 * 1024

_Row = TypeVar("_Row", ArchiveBlockRow, SummaryRow)


def _redactor(setting: Redactor | bool) -> Redactor | None:
    if isinstance(setting, Redactor):
        return setting
    return Redactor() if setting else None


def _check_system(system: object) -> Any:
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


def _check_positive(field: str, value: object) -> int | None:
    return None if value is None else check_count(field, value)


def _check_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput("metadata", "must be a dict with string keys")
    copied: dict[str, Any] = json_copy(dict(metadata), "metadata")
    if "\\u0000" in json.dumps(copied):  # PostgreSQL's JSONB cannot hold it
        raise InvalidInput("metadata", "must not contain NUL characters")
    check_unicode("metadata", json.dumps(copied, ensure_ascii=False), InvalidInput)
    return copied


def _check_text(field: str, value: object, max_length: int) -> str | None:
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
    checked = _check_text("key", key, MAX_KEY_LENGTH)
    if not checked:
        raise InvalidInput("key", "must not be empty")
    if checked.endswith(":reply"):
        raise InvalidInput("key", "must not end with ':reply' (convo keys replies that way)")
    return checked


def _unpack(
    conversation_id: str, block: ArchiveBlockRow | _archive.PackedBlock
) -> builtins.list[_archive.ArchivedTurn]:
    """The checked turns of an archive block (a large one unpacked off the event loop)."""
    return off_loop(
        _archive.unpack,
        len(block.payload),
        conversation_id,
        block.first_seq,
        block.last_seq,
        block.payload,
        block.checksum,
    )


def _turn_json(turn: Turn) -> dict[str, Any]:
    return {name: getattr(turn, name) for name in Turn.__dataclass_fields__}


class AlreadyAnswered(Exception):
    """A send's idempotency key already has its reply stored: ``message``."""

    def __init__(self, message: Message) -> None:
        super().__init__(message.seq)
        self.message = message


def reply_key(key: str) -> str:
    """The idempotency key of the reply to the user turn stored with ``key``."""
    return f"{key}:reply"


def _row_values(message: Message) -> dict[str, Any]:
    """A stored turn as the values of its ``convo_messages`` row."""
    return {column: getattr(message, column) for column in MESSAGE_COLUMNS}


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


def _message(row: MessageRow, content: list[Block]) -> Message:
    return Message(
        conversation_id=row.conversation_id,
        seq=row.seq,
        role=validate_role(row.role),
        content=content,
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


@dataclass(frozen=True, slots=True)
class LiveState:
    """One consistent read of what the context engine needs."""

    row: ConversationRow
    summary: SummaryPart | None
    turns: list[LiveTurn]


@dataclass(frozen=True, slots=True)
class Compaction:
    """What one compaction did."""

    first_seq: int
    last_seq: int
    summary: str
    summarizer: str
    raw_bytes: int
    stored_bytes: int


class ConversationStore:
    """Conversations and their turns, persisted in a SQL database.

    ``url`` is a SQLAlchemy database URL; ``None`` means ``CONVO_DATABASE_URL``,
    then a SQLite file in the user data directory. A SQLite database is
    created or upgraded on first use; a server database must be upgraded with
    ``convo db upgrade`` (the store says so if it is behind).

    Options (all keyword-only):

    * ``client``: an ``anthropic.Anthropic`` client; by default one is made on
      first use with the SDK's own settings (``ANTHROPIC_API_KEY``, ...).
    * ``model``: default model of new conversations (else ``CONVO_MODEL``,
      else ``claude-sonnet-5-5``).
    * ``token_budget``: default input-token budget per request.
    * ``summarizer``: makes the rolling summaries (default: Claude, through
      ``client``); ``summarizer_fallback`` is used at once if it fails
      (default: none: the summarizer is retried with backoff, and after 3
      failures in a row the extractive summary stands in).
    * ``low_water``: share of the budget the live turns may use after a
      compaction (default 0.55).
    * ``summarizer_input_tokens``: the most raw tokens one summarizer request
      carries (previous summary + turns; default 60,000). A backlog is
      summarized in chunks of this size, one per request, or all at once
      with ``conv.compact()``.
    * ``token_counter``: anything with ``count(text) -> int`` (default cl100k).
      The correction factor stays within 1.0-2.0: a counter should count no
      more than Claude does, nor less than half of it.
    * ``max_retries``: the SDK's retries (default 2): 429, 5xx, 529 overloaded
      and connection errors, honouring ``retry-after``. convo adds none.
    * ``requests_per_minute``, ``input_tokens_per_minute``,
      ``max_concurrent_requests``: client-side limits shared by every
      conversation of the store, across threads (waits are logged).
    * ``redact_requests``, ``redact_storage``: ``True`` or a :class:`Redactor`
      to redact personal data and secrets from what is sent to the API and/or
      from what is stored. Both off by default.
    * ``prices``: overrides of the price table (USD per million tokens).
    * ``send_lease``: seconds a send's claim on a conversation outlives its
      process if it dies mid-call (default 60); a live sender renews it every
      ``send_lease / 3`` seconds.
    * ``send_timeout``: seconds a whole send may take (default: none beyond
      the SDK's own timeouts); see the README.
    * ``pool_size``: database connections kept open (default: SQLAlchemy's 5;
      up to twice as many more open under load). Each send holds one only
      while it reads or writes, never during the API call.
    * ``auto_replay``: write replies pending in the outbox (billed replies the
      database could not take) when the store opens and before each write
      (default True).
    * ``exact_token_counts``: also ask ``client.messages.count_tokens`` for the
      exact size of every request before it is sent (one more API call per
      turn, on its own rate limit); it calibrates too.
    * ``recall``: before each request, look up the earlier turns most relevant
      to the newest user turn and add the best ones to the request (default
      on); ``recall_scope``: ``"conversation"`` (default) or ``"user"`` (also
      the other conversations of the conversation's ``user_id``, never another
      user's); ``recall_share``: share of the budget they may use (0.10).
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        client: Any = None,
        model: str | None = None,
        token_budget: int | None = None,
        summarizer: Summarizer | None = None,
        summarizer_fallback: Summarizer | None = None,
        low_water: float = DEFAULT_LOW_WATER,
        summarizer_input_tokens: int = DEFAULT_SUMMARIZER_INPUT_TOKENS,
        token_counter: TokenCounter | None = None,
        exact_token_counts: bool = False,
        max_retries: int | None = None,
        requests_per_minute: int | None = None,
        input_tokens_per_minute: int | None = None,
        max_concurrent_requests: int | None = None,
        redact_requests: Redactor | bool = False,
        redact_storage: Redactor | bool = False,
        prices: Mapping[str, Any] | None = None,
        send_lease: float = DEFAULT_SEND_LEASE,
        recall: bool = DEFAULT_RECALL,
        recall_scope: str = "conversation",
        recall_share: float = DEFAULT_SHARE,
        send_timeout: float | None = None,
        auto_replay: bool = True,
        pool_size: int | None = None,
        echo: bool = False,
    ) -> None:
        self._url = resolve_url(url)
        self._client = client
        #: The client the store made itself (closed with the store), if any.
        self._own_client: Any = None
        self.model: str = model or os.environ.get(ENV_MODEL) or DEFAULT_MODEL
        self.token_budget = _check_positive("token_budget", token_budget)
        if not 0.05 <= low_water <= 0.95:
            raise InvalidInput("low_water", f"must be between 0.05 and 0.95, not {low_water!r}")
        self.low_water = low_water
        checked = _check_positive("summarizer_input_tokens", summarizer_input_tokens)
        if checked is None or checked < MIN_SUMMARIZER_INPUT_TOKENS:
            raise InvalidInput(
                "summarizer_input_tokens",
                f"must be at least {MIN_SUMMARIZER_INPUT_TOKENS:,}, "
                f"not {summarizer_input_tokens!r}",
            )
        self.summarizer_input_tokens: int = checked
        self._summarizer = summarizer
        self.summarizer_fallback = summarizer_fallback
        self.token_counter: TokenCounter = token_counter or TiktokenCounter()
        #: The same counts, remembered for the texts counted on every request.
        self.cached_counter = CachingCounter(self.token_counter)
        self.exact_token_counts = exact_token_counts
        self.max_retries = _check_positive("max_retries", max_retries) if max_retries else None
        if max_retries == 0:
            self.max_retries = 0
        self.rate_limiter = self._limiter_class(
            requests_per_minute=requests_per_minute,
            input_tokens_per_minute=input_tokens_per_minute,
            max_concurrent=max_concurrent_requests,
        )
        self.request_redactor = _redactor(redact_requests)
        self.storage_redactor = _redactor(redact_storage)
        self.prices = PriceTable(prices)
        self.send_lease = check_seconds("send_lease", send_lease)
        if recall_scope not in SCOPES:
            raise InvalidInput("recall_scope", f"must be one of {SCOPES}, not {recall_scope!r}")
        if (
            isinstance(recall_share, bool)
            or not isinstance(recall_share, int | float)
            or not 0 < recall_share <= 0.5
        ):
            raise InvalidInput(
                "recall_share", f"must be above 0 and at most 0.5, not {recall_share!r}"
            )
        self.recall_enabled = bool(recall)
        self.recall_scope = recall_scope
        self.recall_share = recall_share
        self.send_timeout = (
            None if send_timeout is None else check_seconds("send_timeout", send_timeout)
        )
        if client is not None:
            client = self._adopt_client(client)
            if max_retries is not None:
                # The SDK's own retries, configured once: never a second layer.
                client = client.with_options(max_retries=max_retries)
            self._client = client
        self.pool_size = _check_positive("pool_size", pool_size)
        self.auto_replay = auto_replay
        self._db = Database(
            self._url, echo=echo, asynchronous=self._asynchronous, pool_size=self.pool_size
        )
        if not self._asynchronous:
            self.open()

    #: The faces of the store that differ for the async store (``_aio``): its
    #: database driver awaits, its limiter waits on the loop, its heartbeat is a task.
    _asynchronous: bool = False
    _limiter_class: type[RateLimiter] = RateLimiter
    _heartbeat_class: type[Heartbeat] = ThreadHeartbeat

    def _adopt_client(self, client: Any) -> Any:
        """The client the core calls, for a ``client=`` given to the store."""
        return client

    def _default_client(self, **options: Any) -> Any:
        import anthropic

        return anthropic.Anthropic(**options)

    def open(self) -> None:
        """Check (SQLite: create or upgrade) the schema, then replay the outbox.

        The sync store opens itself; the async store runs this on first use.
        """
        try:
            self._ensure_schema()
        except BaseException:
            self._db.close()
            raise
        if self.auto_replay:
            self.replay_outbox(quiet=True)

    def _ensure_schema(self) -> None:
        with self._db.transaction() as session:
            revision = stored_revision(session.connection())
        if revision is not None and revision == shipped_head():
            return  # the usual case, decided without loading Alembic
        from . import _migrations

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

    @property
    def client(self) -> Any:
        """The ``anthropic`` client: the one given, else one made with the SDK's defaults."""
        if self._client is None:
            client = (
                self._default_client()
                if self.max_retries is None
                else self._default_client(max_retries=self.max_retries)
            )
            if not (client.api_key or client.auth_token or getattr(client, "credentials", None)):
                raise MissingAPIKey(
                    "no Anthropic API key: set ANTHROPIC_API_KEY (or pass client= to "
                    "ConversationStore)"
                )
            self._client = self._own_client = client
        return self._client

    @property
    def limited_client(self) -> LimitedClient:
        """:attr:`client`, its ``messages.create`` and ``count_tokens`` under the store's limits."""
        client = self.client
        limited = self.__dict__.get("_limited")
        if limited is None or limited._client is not client:
            limited = LimitedClient(client, self.rate_limiter, self._estimate_request)
            self.__dict__["_limited"] = limited
        return limited

    def _estimate_request(self, params: dict[str, Any]) -> int:
        """Input tokens of a request convo makes outside a send (summaries), roughly."""
        text = json.dumps([params.get("system"), params.get("messages")], ensure_ascii=False)
        return self.token_counter.count(text)

    @property
    def summarizer(self) -> Summarizer:
        if self._summarizer is None:
            # Through the limiter: summaries count against the store's rate limits.
            self._summarizer = ClaudeSummarizer(lambda: self.limited_client)
        return self._summarizer

    def close(self) -> None:
        """Release the store's database connections (and the client it made, if it made one)."""
        if self._own_client is not None:
            self._own_client.close()
            self._client = self._own_client = None
        self._db.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ConversationStore({self.url!r})"

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
                columns["user_id"] = _check_text("user_id", value, 255)
            elif name == "model":
                columns["model"] = _check_text("model", value, 100)
            elif name == "token_budget":
                columns["token_budget"] = _check_positive("token_budget", value)
            elif name == "title":
                title = _check_text("title", value, 500)
                columns["title"] = redactor.redact_text(title) if redactor and title else title
            elif name == "system":
                system = _check_system(value)
                columns["system"] = redactor.redact_system(system) if redactor else system
            elif name == "metadata":
                metadata = _check_metadata(value)
                columns["metadata_"] = redactor.redact_json(metadata) if redactor else metadata
            else:
                raise InvalidInput(name, "is not an attribute of a conversation")
        return columns

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
        from ._conversation import Conversation

        now = utcnow()
        row = ConversationRow(
            id=new_conversation_id(),
            **self.conversation_columns(
                {
                    "user_id": user_id,
                    "title": title,
                    "model": model,
                    "system": system,
                    "token_budget": token_budget,
                    "metadata": metadata,
                }
            ),
            last_seq=0,
            archived_through_seq=0,
            created_at=now,
            updated_at=now,
        )
        with self._db.transaction(write=True) as session:
            session.add(row)
        return Conversation(self, row)

    def get(self, conversation_id: str) -> Conversation:
        """The conversation with this id; :class:`ConversationNotFound` if there is none."""
        from ._conversation import Conversation

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
        from ._conversation import Conversation

        _check_positive("limit", limit)
        query = select(ConversationRow).order_by(ConversationRow.id.desc()).limit(limit)
        if user_id is not None:
            query = query.where(ConversationRow.user_id == user_id)
        if before is not None:
            query = query.where(ConversationRow.id < before)
        with self._db.transaction() as session:
            return [Conversation(self, row) for row in session.scalars(query)]

    def iter_conversations(
        self, *, user_id: str | None = None, since: datetime | None = None
    ) -> Iterator[Conversation]:
        """Every conversation (optionally one user's, or active since a time), newest first.

        Read a page at a time, so any number of conversations can be walked.
        """
        check_time("since", since)
        from ._conversation import Conversation

        before: str | None = None
        while True:
            query = select(ConversationRow).order_by(ConversationRow.id.desc()).limit(500)
            if user_id is not None:
                query = query.where(ConversationRow.user_id == user_id)
            if since is not None:
                query = query.where(ConversationRow.updated_at >= since)
            if before is not None:
                query = query.where(ConversationRow.id < before)
            with self._db.transaction() as session:
                rows = session.scalars(query).all()
            if not rows:
                return
            for row in rows:
                yield Conversation(self, row)
            before = rows[-1].id

    def search(
        self,
        query: str,
        *,
        conversation_id: str | None = None,
        limit: int = 20,
        role: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> builtins.list[SearchHit]:
        """Turns matching every term of ``query``, newest first, with snippets.

        Terms are words, prefixes (``refund*``) and ``"quoted phrases"``.
        ``role`` keeps only user or assistant turns; ``since``/``until`` (aware
        datetimes) bound when the turns were written. Covers the whole history
        (archived turns too), using the database's own full-text index.
        """
        _check_positive("limit", limit)
        with self._db.transaction() as session:
            if conversation_id is not None:
                self._row(session, conversation_id)
            return run_search(
                session,
                query,
                conversation_id=conversation_id,
                limit=limit,
                role=role,
                since=since,
                until=until,
            )

    def recall(
        self,
        query: str,
        *,
        user_id: str | None = None,
        conversation_id: str | None = None,
        k: int = DEFAULT_K,
    ) -> builtins.list[RecallHit]:
        """The ``k`` turns most relevant to ``query``, live or archived, best first.

        Any word of ``query`` may match, by its stem ("trams" finds "tram");
        stop words are dropped; ranking is the database's own (FTS5 ``bm25``,
        PostgreSQL ``ts_rank_cd``, MySQL/MariaDB natural-language relevance).
        ``user_id`` keeps to that user's conversations, ``conversation_id`` to
        one conversation. A query with no word raises :class:`InvalidInput`;
        one of stop words only finds nothing. Only the first 4,000 characters
        and 32 distinct words of ``query`` are used.
        """
        terms = query_terms(query)
        _check_positive("k", k)
        _check_text("user_id", user_id, 255)
        with self._db.transaction() as session:
            if conversation_id is not None:
                self._row(session, conversation_id)
            return run_recall(session, terms, conversation_id=conversation_id, user_id=user_id, k=k)

    def recall_for(self, query: RecallQuery, k: int) -> builtins.list[RecallHit]:
        """The hits for a request's recall lookup (see ``_recall.plan``)."""
        with self._db.transaction() as session:
            return run_recall(
                session,
                query.terms,
                conversation_id=query.conversation_id,
                user_id=query.user_id,
                exclude=(query.exclude_conversation, query.exclude_from_seq),
                k=k,
            )

    def message_total(self, *, user_id: str | None = None, since: datetime | None = None) -> int:
        """How many turns the conversations chosen by these filters hold."""
        check_time("since", since)
        query = select(func.coalesce(func.sum(ConversationRow.last_seq), 0))
        if user_id is not None:
            query = query.where(ConversationRow.user_id == user_id)
        if since is not None:
            query = query.where(ConversationRow.updated_at >= since)
        with self._db.transaction() as session:
            return int(session.scalar(query) or 0)

    def prune(self, *, older_than: timedelta, dry_run: bool = False) -> tuple[int, int]:
        """Delete whole conversations with no activity for ``older_than``.

        Returns (conversations, messages) deleted (or that would be, with
        ``dry_run``).
        """
        stale = self.stale(older_than=older_than)
        if dry_run:
            return len(stale), sum(c.message_count for c in stale)
        return self.delete_many([c.id for c in stale])

    def stale(self, *, older_than: timedelta) -> builtins.list[Conversation]:
        """The conversations with no activity for ``older_than``, least recent first."""
        from ._conversation import Conversation

        check_duration("older_than", older_than)
        cutoff = utcnow() - older_than
        with self._db.transaction() as session:
            rows = session.scalars(
                select(ConversationRow)
                .where(ConversationRow.updated_at < cutoff)
                .order_by(ConversationRow.updated_at)
            ).all()
        return [Conversation(self, row) for row in rows]

    def delete_many(self, conversation_ids: Sequence[str]) -> tuple[int, int]:
        """Delete these conversations; returns (conversations, messages) deleted.

        One gone meanwhile is skipped.
        """
        conversations = messages = 0
        for conversation_id in conversation_ids:
            with self._db.transaction() as session:
                try:
                    turns = self._row(session, conversation_id).last_seq
                except ConversationNotFound:
                    continue
            try:
                self.delete(conversation_id)
            except ConversationNotFound:
                continue  # deleted meanwhile
            conversations += 1
            messages += turns
        return conversations, messages

    def verify(self) -> builtins.list[str]:
        """Check every conversation against the rules in :mod:`convo._verify`.

        Returns the faults found (empty when all is well). Reads everything.
        """
        faults: list[str] = []
        for conv in self.iter_conversations():
            faults.extend(self._verify_conversation(conv.id))
        return faults

    def _verify_conversation(self, conversation_id: str) -> builtins.list[str]:
        # Content is read as the stored text, so an undecodable value is a finding.
        with self._db.transaction() as session:
            row = self._row(session, conversation_id)
            turns = [
                _verify.StoredTurn(seq, role, raw)
                for seq, role, raw in session.execute(
                    select(MessageRow.seq, MessageRow.role, cast(MessageRow.content, Text))
                    .where(MessageRow.conversation_id == conversation_id)
                    .order_by(MessageRow.seq)
                )
            ]
            blocks = [
                _verify.StoredBlock(*block)
                for block in session.execute(
                    select(
                        ArchiveBlockRow.first_seq,
                        ArchiveBlockRow.last_seq,
                        ArchiveBlockRow.payload,
                        ArchiveBlockRow.checksum,
                    )
                    .where(ArchiveBlockRow.conversation_id == conversation_id)
                    .order_by(ArchiveBlockRow.first_seq)
                )
            ]
            summaries = session.scalars(
                select(SummaryRow.through_seq).where(SummaryRow.conversation_id == conversation_id)
            ).all()
        facts = _verify.StoredConversation(row.id, row.last_seq, row.archived_through_seq)
        return _verify.check_conversation(facts, turns, blocks, summaries)

    def delete(self, conversation_id: str) -> None:
        """Delete a conversation with all its turns, archive blocks and summaries."""
        with self._db.transaction(write=True) as session:
            self._row(session, conversation_id, lock=True)
            for table in (SearchTextRow, MessageRow, ArchiveBlockRow, SummaryRow):
                session.execute(delete(table).where(table.conversation_id == conversation_id))
            session.execute(delete(ConversationRow).where(ConversationRow.id == conversation_id))

    def find(self, reference: str) -> Conversation:
        """The conversation whose id is ``reference`` or starts with it.

        ``conv_`` may be left out (``01JD8`` finds ``conv_01JD8...``). Raises
        :class:`ConversationNotFound` if none matches, and :class:`InvalidInput`
        listing the candidates if more than one does.
        """
        from ._conversation import Conversation

        text = str(reference).strip()
        body = text[len(ID_PREFIX) :] if text.lower().startswith(ID_PREFIX) else text
        if not body or not is_id_prefix(body):
            raise ConversationNotFound(text)
        prefix = ID_PREFIX + body.upper()
        query = (
            select(ConversationRow)
            .where(ConversationRow.id.startswith(prefix, autoescape=True))
            .order_by(ConversationRow.id)  # a whole id sorts before the longer ones
            .limit(FIND_CANDIDATES + 1)
        )
        with self._db.transaction() as session:
            rows = session.scalars(query).all()
        if not rows:
            raise ConversationNotFound(text)
        if len(rows) > 1 and rows[0].id != prefix:
            shown = ", ".join(r.id for r in rows[:FIND_CANDIDATES])
            more = " and more" if len(rows) > FIND_CANDIDATES else ""
            raise InvalidInput(
                "id", f"{text!r} matches several conversations ({shown}{more}); give more of it"
            )
        return Conversation(self, rows[0])

    def latest(self, *, user_id: str | None = None) -> Conversation | None:
        """The conversation with the most recent activity (optionally one user's), if any."""
        from ._conversation import Conversation

        query = (
            select(ConversationRow)
            .order_by(ConversationRow.updated_at.desc(), ConversationRow.id.desc())
            .limit(1)
        )
        if user_id is not None:
            query = query.where(ConversationRow.user_id == user_id)
        with self._db.transaction() as session:
            row = session.scalars(query).one_or_none()
        return None if row is None else Conversation(self, row)

    def replace_turn(self, conversation_id: str, seq: int, turn: Turn) -> ConversationRow:
        """Store ``turn``'s content and token count as live turn ``seq``'s (locked)."""
        with self._db.transaction(write=True) as session:
            conversation = self._editable(session, conversation_id, range(seq, seq + 1))
            session.execute(
                update(MessageRow)
                .where(MessageRow.conversation_id == conversation_id, MessageRow.seq == seq)
                .values(content=turn.content, token_count=turn.token_count)
            )
            session.execute(
                delete(SearchTextRow).where(
                    SearchTextRow.conversation_id == conversation_id, SearchTextRow.seq == seq
                )
            )
            searchable = searchable_text(turn.content)
            if searchable:
                session.add(
                    SearchTextRow(conversation_id=conversation_id, seq=seq, text=searchable)
                )
            conversation.updated_at = utcnow()
            return conversation

    def delete_turns(self, conversation_id: str, seqs: range) -> ConversationRow:
        """Delete live turns ``seqs`` and renumber the later ones, so seqs stay gap-free."""
        with self._db.transaction(write=True) as session:
            conversation = self._editable(session, conversation_id, seqs)
            for table in (SearchTextRow, MessageRow):
                where = (table.conversation_id == conversation_id,)
                session.execute(delete(table).where(*where, table.seq.between(seqs[0], seqs[-1])))
                # Two steps through negative numbers: a unique (conversation, seq)
                # must hold after every row on every backend.
                later = (*where, table.seq > seqs[-1])
                session.execute(update(table).where(*later).values(seq=-table.seq))
                session.execute(
                    update(table).where(*where, table.seq < 0).values(seq=-table.seq - len(seqs))
                )
            conversation.last_seq -= len(seqs)
            conversation.updated_at = utcnow()
            return conversation

    def _editable(self, session: Session, conversation_id: str, seqs: range) -> ConversationRow:
        """The locked row of a conversation whose turns ``seqs`` may change now."""
        conversation = self._row(session, conversation_id, lock=True)
        if conversation.busy_until is not None and conversation.busy_until > utcnow():
            raise ConversationBusy(conversation_id, conversation.busy_until)
        if seqs[0] <= conversation.archived_through_seq or seqs[-1] > conversation.last_seq:
            raise InvalidInput(
                "seq", f"turns {seqs[0]}-{seqs[-1]} are not all live turns of {conversation_id}"
            )
        return conversation

    # -- turns ---------------------------------------------------------------

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

    def append(
        self, conversation_id: str, turn: Turn, *, release: str | None = None
    ) -> tuple[Message, ConversationRow]:
        """Append ``turn`` as the conversation's next seq, atomically.

        A turn with an idempotency key that is already stored is not written
        again: the stored one is returned. ``release``: the owner of a send's
        claim, cleared in the same transaction (a send's reply and the end of
        its claim are one commit).
        """
        if self.auto_replay:
            self.replay_outbox(quiet=True)
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            if release is not None and conversation.busy_owner == release:
                conversation.busy_until = None
                conversation.busy_owner = None
            existing = self._keyed(session, conversation_id, turn.key)
            if existing is not None:
                return existing, conversation
            return self._append_locked(session, conversation, turn)

    def _keyed(self, session: Session, conversation_id: str, key: str | None) -> Message | None:
        """The stored turn with idempotency ``key`` in the conversation, if any."""
        if key is None:
            return None
        row = session.scalars(
            select(MessageRow).where(
                MessageRow.conversation_id == conversation_id, MessageRow.key == key
            )
        ).one_or_none()
        if row is None:
            return None
        content = row.content
        if content is None:
            content = self._archived_content(session, conversation_id, [row])[row.seq]
        return _message(row, content)

    def claim_and_append(
        self, conversation_id: str, turn: Turn
    ) -> tuple[Message, ConversationRow, str]:
        """Claim the conversation for one send and append its user turn, atomically.

        Raises :class:`ConversationBusy` (writing nothing) while another
        send's claim holds. Returns the claim's owner token for :meth:`release`.
        With an idempotency key already stored, the stored user turn is claimed
        again instead (its reply is then sent for anew), or, if its reply is
        stored too, :class:`AlreadyAnswered` carries that reply.
        """
        if self.auto_replay:
            self.replay_outbox(quiet=True)
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            now = utcnow()
            if conversation.busy_until is not None and conversation.busy_until > now:
                raise ConversationBusy(conversation_id, conversation.busy_until)
            existing = self._keyed(session, conversation_id, turn.key)
            if existing is not None and turn.key is not None:
                reply = self._keyed(session, conversation_id, reply_key(turn.key))
                if reply is not None:
                    raise AlreadyAnswered(reply)
            owner = secrets.token_hex(8)
            conversation.busy_until = now + timedelta(seconds=self.send_lease)
            conversation.busy_owner = owner
            if existing is not None:
                if existing.status == "failed":  # sent again now: no longer a failed turn
                    session.execute(
                        update(MessageRow)
                        .where(
                            MessageRow.conversation_id == conversation_id,
                            MessageRow.seq == existing.seq,
                        )
                        .values(status="complete")
                    )
                    existing = replace(existing, status="complete")
                return existing, conversation, owner
            message, row = self._append_locked(session, conversation, turn)
            return message, row, owner

    def renew(self, conversation_id: str, owner: str) -> bool:
        """Extend a live send's claim by one lease; False if it is no longer the owner's."""
        with self._db.transaction(write=True) as session:
            result = session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id, ConversationRow.busy_owner == owner)
                .values(busy_until=utcnow() + timedelta(seconds=self.send_lease))
            )
            return bool(getattr(result, "rowcount", 0))

    def release(self, conversation_id: str, owner: str | None = None) -> bool:
        """End a send's claim: the owner's (``owner``), or whoever holds it (None).

        Returns True if a claim was cleared.
        """
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            if conversation.busy_owner is None and conversation.busy_until is None:
                return False
            if owner is not None and conversation.busy_owner != owner:
                return False
            conversation.busy_until = None
            conversation.busy_owner = None
            return True

    # -- the outbox ----------------------------------------------------------

    @functools.cached_property
    def outbox(self) -> Outbox:
        """Replies that were billed but could not be written: see :mod:`convo._outbox`."""
        return Outbox(outbox_path(self._url.render_as_string(hide_password=False)), self.url)

    def spool_reply(self, conversation_id: str, user_seq: int, owner: str, turn: Turn) -> str:
        """Keep a reply the database could not take in the outbox, durably."""
        return self.outbox.add(conversation_id, user_seq, owner, _turn_json(turn))

    def pending_replies(self) -> builtins.list[PendingReply]:
        """Replies waiting in the outbox for this database."""
        return self.outbox.pending()

    def replay_outbox(self, *, quiet: bool = False) -> int:
        """Write the outbox's pending replies into their conversations; return how many.

        A reply already stored (the same request id, or idempotency key, in
        its conversation) is not written again. Each written reply also ends
        the claim of the send that made it. With ``quiet``, a database that is
        still unavailable is not an error (the replies stay pending).
        """
        if not self.outbox.has_pending():
            return 0
        written = 0
        try:
            with self.outbox.draining() as (entries, done):
                for entry in entries:
                    if self._replay_one(entry):
                        written += 1
                    done.add(entry.id)
        except (DatabaseUnavailable, sa_exc.SQLAlchemyError):
            if not quiet:
                raise
            logger.warning("outbox: the database is still unavailable; replies stay pending")
        return written

    def _replay_one(self, entry: PendingReply) -> bool:
        turn = Turn(**entry.turn)
        with self._db.transaction(write=True) as session:
            try:
                conversation = self._row(session, entry.conversation_id, lock=True)
            except ConversationNotFound:
                logger.warning(
                    "outbox: conversation %s was deleted; its pending reply is dropped",
                    entry.conversation_id,
                )
                return False
            if self._keyed(session, entry.conversation_id, turn.key) is not None:
                written = True
            elif turn.request_id is not None:
                written = (
                    session.scalar(
                        select(func.count())
                        .select_from(MessageRow)
                        .where(
                            MessageRow.conversation_id == entry.conversation_id,
                            MessageRow.request_id == turn.request_id,
                        )
                    )
                    or 0
                ) > 0
            else:
                written = False
            if not written:
                self._append_locked(session, conversation, turn)
            if conversation.busy_owner == entry.owner:
                conversation.busy_until = None
                conversation.busy_owner = None
        if not written:
            logger.info(
                "outbox: wrote the pending reply to turn %d of %s",
                entry.user_seq,
                entry.conversation_id,
                extra={"conversation_id": entry.conversation_id},
            )
        return not written

    def append_many(
        self, conversation_id: str, turns: Sequence[Turn]
    ) -> tuple[builtins.list[Message], ConversationRow]:
        """Append ``turns`` as the next seqs, in one transaction: all or none."""
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            return self._insert_locked(session, conversation, turns), conversation

    def _append_locked(
        self, session: Session, conversation: ConversationRow, turn: Turn
    ) -> tuple[Message, ConversationRow]:
        return self._insert_locked(session, conversation, [turn])[0], conversation

    def _insert_locked(
        self, session: Session, conversation: ConversationRow, turns: Sequence[Turn]
    ) -> builtins.list[Message]:
        """Insert turns after ``last_seq`` (the conversation's row is locked)."""
        now = utcnow()
        first = conversation.last_seq + 1
        conversation.last_seq += len(turns)
        conversation.updated_at = now
        messages = [
            Message(
                conversation_id=conversation.id,
                seq=seq,
                role=validate_role(turn.role),
                content=turn.content,
                token_count=turn.token_count,
                created_at=now,
                status=turn.status,
                model=turn.model,
                stop_reason=turn.stop_reason,
                usage=turn.usage,
                request_id=turn.request_id,
                latency_ms=turn.latency_ms,
            )
            for seq, turn in enumerate(turns, start=first)
        ]
        # Core inserts (executemany): many turns cost one round trip per batch.
        session.execute(
            insert(MessageRow),
            [{**_row_values(m), "key": t.key} for m, t in zip(messages, turns, strict=True)],
        )
        searchable = [
            {"conversation_id": conversation.id, "seq": m.seq, "text": text}
            for m in messages
            if (text := searchable_text(m.content))
        ]
        if searchable:
            session.execute(insert(SearchTextRow), searchable)
        return messages

    def set_excluded(self, conversation_id: str, seq: int, excluded: bool) -> None:
        """Mark a live turn excluded from requests (or include it again); it stays stored."""
        _check_positive("seq", seq)
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            row = session.scalars(
                select(MessageRow).where(
                    MessageRow.conversation_id == conversation_id, MessageRow.seq == seq
                )
            ).one_or_none()
            if row is None:
                raise InvalidInput("seq", f"conversation {conversation_id} has no turn {seq}")
            if seq <= conversation.archived_through_seq:
                raise InvalidInput(
                    "seq", f"turn {seq} is archived: it is no longer sent (its summary is)"
                )
            if excluded:
                row.status = "excluded"
            elif row.status == "excluded":
                row.status = "complete"

    def set_status(
        self, conversation_id: str, seq: int, status: Status, *, model: str | None = None
    ) -> None:
        """Mark a turn (a failed user turn also records the model it was sent to)."""
        values: dict[str, Any] = {"status": status}
        if model is not None:
            values["model"] = model
        with self._db.transaction(write=True) as session:
            session.execute(
                update(MessageRow)
                .where(MessageRow.conversation_id == conversation_id, MessageRow.seq == seq)
                .values(**values)
            )

    def history(self, conversation_id: str, *, after: int = 0) -> Iterator[Message]:
        """Every turn (after seq ``after``) in order, archived ones read back from their blocks."""
        with self._db.transaction() as session:
            self._row(session, conversation_id)
        while True:
            with self._db.transaction() as session:
                rows = session.scalars(
                    select(MessageRow)
                    .where(MessageRow.conversation_id == conversation_id, MessageRow.seq > after)
                    .order_by(MessageRow.seq)
                    .limit(HISTORY_BATCH)
                ).all()
                archived = self._archived_content(session, conversation_id, rows)
            if not rows:
                return
            for row in rows:
                content = row.content if row.content is not None else archived[row.seq]
                yield _message(row, content)
            after = rows[-1].seq

    def archive_blocks(self, conversation_id: str) -> Iterator[ArchiveBlockRow]:
        """The conversation's archive blocks as stored, in seq order, read in batches."""
        return self._rows_in_order(ArchiveBlockRow, ArchiveBlockRow.first_seq, conversation_id)

    def summaries(self, conversation_id: str) -> Iterator[SummaryRow]:
        """Every summary the conversation's compactions made, oldest first, in batches."""
        return self._rows_in_order(SummaryRow, SummaryRow.through_seq, conversation_id)

    def _rows_in_order(
        self, table: type[_Row], key: Any, conversation_id: str, batch: int = 100
    ) -> Iterator[_Row]:
        after = -1
        while True:
            with self._db.transaction() as session:
                rows = session.scalars(
                    select(table)
                    .where(table.conversation_id == conversation_id, key > after)
                    .order_by(key)
                    .limit(batch)
                ).all()
            if not rows:
                return
            yield from rows
            after = getattr(rows[-1], key.key)

    def _archived_content(
        self, session: Session, conversation_id: str, rows: Sequence[MessageRow]
    ) -> dict[int, builtins.list[Block]]:
        """The content of the archived rows among ``rows``, by seq, from their blocks."""
        missing = [row for row in rows if row.content is None]
        if not missing:
            return {}
        blocks = session.scalars(
            select(ArchiveBlockRow)
            .where(
                ArchiveBlockRow.conversation_id == conversation_id,
                ArchiveBlockRow.last_seq >= missing[0].seq,
                ArchiveBlockRow.first_seq <= missing[-1].seq,
            )
            .order_by(ArchiveBlockRow.first_seq)
        ).all()
        content: dict[int, builtins.list[Block]] = {}
        roles: dict[int, str] = {}
        for block in blocks:
            for turn in _unpack(conversation_id, block):
                content[turn.seq] = turn.content
                roles[turn.seq] = turn.role
        for row in missing:
            if row.seq not in content or roles[row.seq] != row.role:
                raise ArchiveCorrupted(
                    conversation_id, row.seq, row.seq, "no archive block holds this turn"
                )
        return content

    # -- the live window -------------------------------------------------------

    def live_state(self, conversation_id: str) -> LiveState:
        """The conversation, its latest summary and all its live turns, read together.

        Reads every live turn: for tools and tests. Requests read only what
        they can send (:meth:`window_head`, :meth:`live_turns`).
        """
        with self._db.transaction() as session:
            row = self._row(session, conversation_id)
            summary = self._summary(session, row)
            turns = self._live_turns(
                session,
                conversation_id,
                row.archived_through_seq + 1,
                row.last_seq,
                newest_first=False,
                limit=max(row.last_seq, 1),
            )
        return LiveState(row, summary, turns)

    def window_head(self, conversation_id: str) -> tuple[ConversationRow, SummaryPart | None]:
        """The conversation and its latest summary: one short read, whatever the history."""
        with self._db.transaction() as session:
            row = self._row(session, conversation_id)
            return row, self._summary(session, row)

    @staticmethod
    def _summary(session: Session, row: ConversationRow) -> SummaryPart | None:
        found = session.execute(
            select(SummaryRow.text, SummaryRow.through_seq, SummaryRow.token_count)
            .where(
                SummaryRow.conversation_id == row.id,
                SummaryRow.through_seq == row.archived_through_seq,
            )
            .limit(1)
        ).one_or_none()
        if found is None:
            return None
        # Its token count (summary header included) was stored when it was made.
        return SummaryPart(found.text, found.through_seq, found.token_count)

    @staticmethod
    def _live_turns(
        session: Session,
        conversation_id: str,
        low: int,
        high: int,
        *,
        newest_first: bool,
        limit: int,
    ) -> builtins.list[LiveTurn]:
        order = MessageRow.seq.desc() if newest_first else MessageRow.seq
        rows = session.execute(
            select(
                MessageRow.seq,
                MessageRow.role,
                MessageRow.content,
                MessageRow.token_count,
                MessageRow.status,
                MessageRow.model,
            )
            .where(
                MessageRow.conversation_id == conversation_id,
                MessageRow.seq.between(low, high),
                # Turns excluded with conv.exclude() stay stored but are never sent.
                MessageRow.status != "excluded",
            )
            .order_by(order)
            .limit(limit)
        ).all()
        return [
            LiveTurn(r.seq, r.role, r.content or [], r.token_count, r.status, r.model) for r in rows
        ]

    def live_turns(
        self,
        conversation_id: str,
        *,
        first_seq: int,
        last_seq: int,
        newest_first: bool,
        enough: Callable[[builtins.list[LiveTurn]], bool],
    ) -> tuple[builtins.list[LiveTurn], bool]:
        """Live turns between two seqs, oldest first, read in batches until ``enough(turns)``.

        ``newest_first`` reads back from ``last_seq`` (batches of 128, doubling),
        else forward from ``first_seq`` (batches of 1,000). The flag returned
        says every turn of the range was read.
        """
        with self._db.transaction() as session:
            return self._read_turns(
                session, conversation_id, first_seq, last_seq, newest_first, enough
            )

    def live_window(
        self,
        conversation_id: str,
        reader: Callable[
            [ConversationRow, SummaryPart | None],
            tuple[int, Callable[[builtins.list[LiveTurn]], bool]],
        ],
    ) -> tuple[ConversationRow, SummaryPart | None, builtins.list[LiveTurn], bool]:
        """The conversation, its summary and its newest live turns, in one read.

        ``reader(row, summary)`` says from which seq on, and when the turns read
        newest first are enough (see :meth:`live_turns`).
        """
        with self._db.transaction() as session:
            row = self._row(session, conversation_id)
            summary = self._summary(session, row)
            first_seq, enough = reader(row, summary)
            turns, reached = self._read_turns(
                session, conversation_id, first_seq, row.last_seq, True, enough
            )
        return row, summary, turns, reached

    def _read_turns(
        self,
        session: Session,
        conversation_id: str,
        first_seq: int,
        last_seq: int,
        newest_first: bool,
        enough: Callable[[builtins.list[LiveTurn]], bool],
    ) -> tuple[builtins.list[LiveTurn], bool]:
        turns: builtins.list[LiveTurn] = []
        low, high = first_seq, last_seq
        batch = TAIL_BATCH if newest_first else CHUNK_BATCH
        while low <= high:
            more = self._live_turns(
                session, conversation_id, low, high, newest_first=newest_first, limit=batch
            )
            if not more:
                break
            if newest_first:
                more.reverse()
                turns = more + turns
                high = more[0].seq - 1
            else:
                turns.extend(more)
                low = more[-1].seq + 1
            if low <= high and enough(turns):
                return turns, False
            batch = min(batch * 2, CHUNK_BATCH)
        return turns, True

    def set_compaction_state(
        self,
        conversation_id: str,
        *,
        window_start_seq: int | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        """Persist where requests start and/or the summarizer's backoff."""
        values: dict[str, Any] = {}
        if window_start_seq is not None:
            values["window_start_seq"] = window_start_seq
        if backoff is not None:
            values["compaction_failures"] = backoff.failures
            values["compaction_retry_at"] = backoff.retry_at
        if not values:
            return
        with self._db.transaction(write=True) as session:
            session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id)
                .values(**values)
            )

    def write_chunk(
        self,
        conversation_id: str,
        *,
        archived_through_seq: int,
        last_seq: int,
        result: SummaryResult,
        backoff: Backoff | None = None,
    ) -> Compaction | None:
        """Archive turns ``archived_through_seq + 1 .. last_seq`` and store their summary.

        One transaction under the conversation's lock: the archive blocks (at
        most ``MAX_BLOCK_TURNS`` turns / ``MAX_BLOCK_BYTES`` each), the summary
        row, the rows' content let go, and ``backoff`` if given. Only if nobody
        compacted meanwhile (else None: their summary stands).
        """
        first_seq = archived_through_seq + 1
        summary_tokens = self.count_text(
            summary_block(SummaryPart(result.text, last_seq, 0))["text"]
        )
        with self._db.transaction(write=True) as session:
            row = self._row(session, conversation_id, lock=True)
            if row.archived_through_seq != archived_through_seq:
                return None  # another process compacted first; its summary stands
            in_range = (
                MessageRow.conversation_id == conversation_id,
                MessageRow.seq.between(first_seq, last_seq),
            )
            rows = session.execute(
                select(MessageRow.seq, MessageRow.role, MessageRow.content)
                .where(*in_range)
                .order_by(MessageRow.seq)
            ).all()
            turns = [_archive.ArchivedTurn(r.seq, r.role, r.content or []) for r in rows]
            packed = off_loop(
                _archive.pack_bounded,
                rough_size([t.content for t in turns]),
                turns,
                max_turns=MAX_BLOCK_TURNS,
                max_bytes=MAX_BLOCK_BYTES,
            )
            now = utcnow()
            read_back: builtins.list[_archive.ArchivedTurn] = []
            for block in packed:
                # Prove each block reads back to exactly its turns before the rows let go.
                read_back.extend(_unpack(conversation_id, block))
                session.add(
                    ArchiveBlockRow(
                        conversation_id=conversation_id,
                        first_seq=block.first_seq,
                        last_seq=block.last_seq,
                        payload=block.payload,
                        checksum=block.checksum,
                        raw_bytes=block.raw_bytes,
                        created_at=now,
                    )
                )
            if read_back != turns:
                raise AssertionError("archive blocks do not read back to their turns")
            session.add(
                SummaryRow(
                    conversation_id=conversation_id,
                    through_seq=last_seq,
                    text=result.text,
                    token_count=summary_tokens,
                    summarizer=result.summarizer,
                    model=result.model,
                    usage=result.usage,
                    created_at=now,
                )
            )
            session.execute(update(MessageRow).where(*in_range).values(content=None))
            row.archived_through_seq = last_seq
            if backoff is not None:
                row.compaction_failures = backoff.failures
                row.compaction_retry_at = backoff.retry_at
        logger.info(
            "compacted turns %d-%d of %s (%s summary)",
            first_seq,
            last_seq,
            conversation_id,
            result.summarizer,
            extra={"conversation_id": conversation_id},
        )
        return Compaction(
            first_seq,
            last_seq,
            result.text,
            result.summarizer,
            sum(b.raw_bytes for b in packed),
            sum(len(b.payload) for b in packed),
        )

    def update_conversation(self, conversation_id: str, changes: dict[str, Any]) -> ConversationRow:
        with self._db.transaction(write=True) as session:
            row = self._row(session, conversation_id, lock=True)
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            return row

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

    def usage(
        self,
        *,
        conversation_id: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        group_by: GroupBy | None = None,
    ) -> UsageReport:
        """Requests, tokens by kind, cache hit ratio, cost, errors and latency.

        Counts every reply stored from an API call, every summary Claude wrote,
        and every failed call; optionally for one conversation, one user, or
        since a time; grouped by ``"conversation"``, ``"model"`` or ``"day"``.
        """
        if group_by is not None and group_by not in GROUPINGS:
            raise InvalidInput("group_by", f"must be one of {', '.join(GROUPINGS)}")
        check_time("since", since)
        if conversation_id is not None:
            with self._db.transaction() as session:
                self._row(session, conversation_id)
        return summarize(
            self._call_records(conversation_id, user_id, since), self.prices, group_by=group_by
        )

    def _call_records(
        self, conversation_id: str | None, user_id: str | None, since: datetime | None
    ) -> Iterator[CallRecord]:
        replies = select(
            MessageRow.conversation_id,
            MessageRow.role,
            MessageRow.status,
            MessageRow.model,
            MessageRow.usage,
            MessageRow.latency_ms,
            MessageRow.created_at,
        )
        summaries = select(
            SummaryRow.conversation_id, SummaryRow.model, SummaryRow.usage, SummaryRow.created_at
        )
        for table, query in ((MessageRow, replies), (SummaryRow, summaries)):
            if conversation_id is not None:
                query = query.where(table.conversation_id == conversation_id)
            if since is not None:
                query = query.where(table.created_at >= since)
            if user_id is not None:
                query = query.join(
                    ConversationRow, ConversationRow.id == table.conversation_id
                ).where(ConversationRow.user_id == user_id)
            if table is MessageRow:
                query = query.where(
                    (MessageRow.role == "assistant") | (MessageRow.status == "failed")
                )
            with self._db.transaction() as session:
                for row in session.execute(query.execution_options(yield_per=HISTORY_BATCH)):
                    if table is SummaryRow:
                        if row.usage:
                            yield CallRecord(
                                row.conversation_id,
                                row.model,
                                row.created_at,
                                row.usage,
                                None,
                                kind="summary",
                            )
                    elif row.status == "failed":
                        yield CallRecord(
                            row.conversation_id,
                            row.model,
                            row.created_at,
                            None,
                            None,
                            failed=True,
                            kind="failed",
                        )
                    elif row.usage:
                        yield CallRecord(
                            row.conversation_id,
                            row.model,
                            row.created_at,
                            row.usage,
                            row.latency_ms,
                            failed=row.status == "incomplete",
                        )

    # -- calibration -------------------------------------------------------------

    def calibration(self, model: str) -> Calibration:
        """The token-count correction of ``model``, as learned so far."""
        with self._db.transaction() as session:
            row = session.get(CalibrationRow, model)
            return Calibration(row.factor, row.samples) if row else Calibration()

    def observe_usage(self, model: str, raw_tokens: int, actual_tokens: int) -> Calibration:
        """Fold one request's reported input size into ``model``'s calibration."""
        for _ in range(3):
            try:
                with self._db.transaction(write=True) as session:
                    row = session.scalars(
                        select(CalibrationRow)
                        .where(CalibrationRow.model == model)
                        .with_for_update()
                        .execution_options(populate_existing=True)
                    ).one_or_none()
                    before = Calibration(row.factor, row.samples) if row else Calibration()
                    after = before.observe(raw_tokens, actual_tokens)
                    if after is before:
                        return before
                    if row is None:
                        session.add(
                            CalibrationRow(
                                model=model,
                                factor=after.factor,
                                samples=after.samples,
                                updated_at=utcnow(),
                            )
                        )
                    else:
                        row.factor, row.samples, row.updated_at = (
                            after.factor,
                            after.samples,
                            utcnow(),
                        )
                    return after
            except sa_exc.IntegrityError:
                continue  # another process inserted the first row: read it and fold again
        return self.calibration(model)
