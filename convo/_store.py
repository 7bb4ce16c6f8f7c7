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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import URL, delete, func, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from . import _archive, _migrations
from ._budget import Calibration
from ._content import Block, normalize_content, validate_role
from ._database import Database, mask, resolve_url
from ._ids import is_conversation_id, new_conversation_id
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
from ._pricing import PriceTable
from ._ratelimit import RateLimiter
from ._redaction import Redactor
from ._search import SearchHit, searchable_text
from ._search import search as run_search
from ._summarizer import ClaudeSummarizer, Summarizer, SummaryResult, SummaryTurn
from ._tokens import TiktokenCounter, TokenCounter, count_turn
from ._usage import GROUPINGS, CallRecord, GroupBy, UsageReport, summarize
from ._window import LiveTurn, SummaryPart, summary_block
from .errors import (
    ArchiveCorrupted,
    ConversationBusy,
    ConversationNotFound,
    InvalidInput,
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
#: After a compaction the live turns use at most this share of the budget.
DEFAULT_LOW_WATER: Final = 0.55
#: How long a send's claim on a conversation outlives a crashed sender.
DEFAULT_SEND_LEASE: Final = 900.0
#: Rows fetched per round trip when reading a long history.
HISTORY_BATCH: Final = 1_000


def _redactor(setting: Redactor | bool) -> Redactor | None:
    if isinstance(setting, Redactor):
        return setting
    return Redactor() if setting else None


def _check_system(system: object) -> Any:
    if system is None or isinstance(system, str):
        return system
    if isinstance(system, list) and all(
        isinstance(block, Mapping) and block.get("type") == "text" for block in system
    ):
        return [dict(block) for block in system]
    raise InvalidInput("system", "must be a string or a list of text blocks")


def _check_positive(field: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(field, f"must be a positive integer, not {value!r}")
    return value


def _check_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput("metadata", "must be a dict with string keys")
    try:
        encoded = json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput("metadata", f"is not JSON-serialisable: {exc}") from None
    if "\\u0000" in encoded:  # PostgreSQL's JSONB cannot hold it
        raise InvalidInput("metadata", "must not contain NUL characters")
    copied: dict[str, Any] = json.loads(encoded)
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
    return value


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
      ``client``); ``summarizer_fallback`` is used if it fails (default: none,
      the turns stay live and the failure is logged or raised).
    * ``low_water``: share of the budget the live turns may use after a
      compaction (default 0.55).
    * ``token_counter``: anything with ``count(text) -> int`` (default cl100k).
    * ``max_retries``: the SDK's retries (default 2): 429, 5xx, 529 overloaded
      and connection errors, honouring ``retry-after``. convo adds none.
    * ``requests_per_minute``, ``input_tokens_per_minute``,
      ``max_concurrent_requests``: client-side limits shared by every
      conversation of the store, across threads (waits are logged).
    * ``redact_requests``, ``redact_storage``: ``True`` or a :class:`Redactor`
      to redact personal data and secrets from what is sent to the API and/or
      from what is stored. Both off by default.
    * ``prices``: overrides of the price table (USD per million tokens).
    * ``send_lease``: seconds a send's claim on a conversation lasts if its
      process dies mid-call (default 900).
    * ``exact_token_counts``: also ask ``client.messages.count_tokens`` for the
      exact size of every request before it is sent (one more API call per
      turn, on its own rate limit); it calibrates too.
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
        echo: bool = False,
    ) -> None:
        self._url = resolve_url(url)
        self._client = client
        self.model: str = model or os.environ.get(ENV_MODEL) or DEFAULT_MODEL
        self.token_budget = _check_positive("token_budget", token_budget)
        if not 0.05 <= low_water <= 0.95:
            raise InvalidInput("low_water", f"must be between 0.05 and 0.95, not {low_water!r}")
        self.low_water = low_water
        self._summarizer = summarizer
        self.summarizer_fallback = summarizer_fallback
        self.token_counter: TokenCounter = token_counter or TiktokenCounter()
        self.exact_token_counts = exact_token_counts
        self.max_retries = _check_positive("max_retries", max_retries) if max_retries else None
        if max_retries == 0:
            self.max_retries = 0
        self.rate_limiter = RateLimiter(
            requests_per_minute=requests_per_minute,
            input_tokens_per_minute=input_tokens_per_minute,
            max_concurrent=max_concurrent_requests,
        )
        self.request_redactor = _redactor(redact_requests)
        self.storage_redactor = _redactor(redact_storage)
        self.prices = PriceTable(prices)
        if send_lease <= 0:
            raise InvalidInput(
                "send_lease", f"must be a positive number of seconds, not {send_lease!r}"
            )
        self.send_lease = send_lease
        if client is not None and max_retries is not None:
            # The SDK's own retries, configured once: never a second layer.
            self._client = client.with_options(max_retries=max_retries)
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

    @property
    def client(self) -> Any:
        """The ``anthropic`` client: the one given, else one made with the SDK's defaults."""
        if self._client is None:
            import anthropic

            client = (
                anthropic.Anthropic()
                if self.max_retries is None
                else anthropic.Anthropic(max_retries=self.max_retries)
            )
            if not (client.api_key or client.auth_token or getattr(client, "credentials", None)):
                raise MissingAPIKey(
                    "no Anthropic API key: set ANTHROPIC_API_KEY (or pass client= to "
                    "ConversationStore)"
                )
            self._client = client
        return self._client

    @property
    def summarizer(self) -> Summarizer:
        if self._summarizer is None:
            self._summarizer = ClaudeSummarizer(lambda: self.client)
        return self._summarizer

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
        from ._conversation import Conversation

        now = utcnow()
        row = ConversationRow(
            id=new_conversation_id(),
            user_id=_check_text("user_id", user_id, 255),
            title=_check_text("title", title, 500),
            model=_check_text("model", model, 100),
            system=_check_system(system),
            token_budget=_check_positive("token_budget", token_budget),
            metadata_=_check_metadata(metadata),
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
        self, query: str, *, conversation_id: str | None = None, limit: int = 20
    ) -> builtins.list[SearchHit]:
        """Turns whose text has every word of ``query``, newest first, with snippets.

        Covers the whole history (archived turns too), using the database's
        own full-text index.
        """
        _check_positive("limit", limit)
        with self._db.transaction() as session:
            if conversation_id is not None:
                self._row(session, conversation_id)
            return run_search(session, query, conversation_id=conversation_id, limit=limit)

    def message_total(self, *, user_id: str | None = None, since: datetime | None = None) -> int:
        """How many turns the conversations chosen by these filters hold."""
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
        if older_than.total_seconds() <= 0:
            raise InvalidInput("older_than", "must be a positive duration")
        cutoff = utcnow() - older_than
        conversations = messages = 0
        with self._db.transaction() as session:
            stale = session.execute(
                select(ConversationRow.id, ConversationRow.last_seq).where(
                    ConversationRow.updated_at < cutoff
                )
            ).all()
        for conversation_id, last_seq in stale:
            if not dry_run:
                try:
                    self.delete(conversation_id)
                except ConversationNotFound:
                    continue  # deleted meanwhile
            conversations += 1
            messages += last_seq
        return conversations, messages

    def verify(self) -> builtins.list[str]:
        """Check every conversation: seq continuity, archive coverage, every block's checksum.

        Returns the faults found (empty when all is well). Reads everything.
        """
        faults: list[str] = []
        for conv in self.iter_conversations():
            faults.extend(self._verify_conversation(conv.id))
        return faults

    def _verify_conversation(self, conversation_id: str) -> builtins.list[str]:
        faults: builtins.list[str] = []
        with self._db.transaction() as session:
            row = self._row(session, conversation_id)
            rows = session.execute(
                select(MessageRow.seq, MessageRow.content.is_(None))
                .where(MessageRow.conversation_id == conversation_id)
                .order_by(MessageRow.seq)
            ).all()
            blocks = session.scalars(
                select(ArchiveBlockRow)
                .where(ArchiveBlockRow.conversation_id == conversation_id)
                .order_by(ArchiveBlockRow.first_seq)
            ).all()
        seqs = [seq for seq, _ in rows]
        if seqs != list(range(1, row.last_seq + 1)):
            missing = sorted(set(range(1, row.last_seq + 1)) - set(seqs))
            faults.append(
                f"{conversation_id}: turns are not numbered 1-{row.last_seq} without gaps"
                + (f" (missing {missing[:10]})" if missing else "")
            )
        covered: set[int] = set()
        for block in blocks:
            # A corrupted block is one fault, not one per turn it holds.
            covered.update(range(block.first_seq, block.last_seq + 1))
            try:
                _archive.unpack(
                    conversation_id, block.first_seq, block.last_seq, block.payload, block.checksum
                )
            except ArchiveCorrupted as exc:
                faults.append(str(exc))
        for seq, archived in rows:
            if archived and seq not in covered:
                faults.append(f"{conversation_id}: turn {seq} is archived but no block holds it")
        return faults

    def delete(self, conversation_id: str) -> None:
        """Delete a conversation with all its turns, archive blocks and summaries."""
        with self._db.transaction(write=True) as session:
            self._row(session, conversation_id, lock=True)
            for table in (SearchTextRow, MessageRow, ArchiveBlockRow, SummaryRow):
                session.execute(delete(table).where(table.conversation_id == conversation_id))
            session.execute(delete(ConversationRow).where(ConversationRow.id == conversation_id))

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
        """Raw tokens one turn with these blocks adds to a request."""
        return count_turn(self.token_counter, blocks)

    @functools.lru_cache(maxsize=256)  # noqa: B019 - the store lives as long as its cache
    def count_text(self, text: str) -> int:
        """Raw tokens of a text (system prompts and summaries; cached)."""
        return self.token_counter.count(text)

    def make_turn(self, role: object, content: object, **fields: Any) -> Turn:
        """Check, redact (``redact_storage``) and count a turn for storing.

        :class:`InvalidMessage` names what is wrong.
        """
        checked_role = validate_role(role)
        blocks = self.for_storage(normalize_content(content))
        return Turn(checked_role, blocks, self.count(blocks), **fields)

    def for_storage(self, blocks: builtins.list[Block]) -> builtins.list[Block]:
        """Blocks as they are stored: redacted if ``redact_storage`` is on."""
        redactor = self.storage_redactor
        return blocks if redactor is None else redactor.redact_blocks(blocks)

    def append(self, conversation_id: str, turn: Turn) -> tuple[Message, ConversationRow]:
        """Append ``turn`` as the conversation's next seq, atomically."""
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            return self._append_locked(session, conversation, turn)

    def claim_and_append(
        self, conversation_id: str, turn: Turn
    ) -> tuple[Message, ConversationRow, str]:
        """Claim the conversation for one send and append its user turn, atomically.

        Raises :class:`ConversationBusy` (writing nothing) while another
        send's claim holds. Returns the claim's owner token for :meth:`release`.
        """
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            now = utcnow()
            if conversation.busy_until is not None and conversation.busy_until > now:
                raise ConversationBusy(conversation_id, conversation.busy_until.isoformat())
            owner = secrets.token_hex(8)
            conversation.busy_until = now + timedelta(seconds=self.send_lease)
            conversation.busy_owner = owner
            message, row = self._append_locked(session, conversation, turn)
            return message, row, owner

    def release(self, conversation_id: str, owner: str) -> None:
        """End a send's claim (if it is still the owner's)."""
        with self._db.transaction(write=True) as session:
            conversation = self._row(session, conversation_id, lock=True)
            if conversation.busy_owner == owner:
                conversation.busy_until = None
                conversation.busy_owner = None

    def _append_locked(
        self, session: Session, conversation: ConversationRow, turn: Turn
    ) -> tuple[Message, ConversationRow]:
        now = utcnow()
        conversation.last_seq += 1
        conversation.updated_at = now
        row = MessageRow(
            conversation_id=conversation.id,
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
        searchable = searchable_text(turn.content)
        if searchable:
            session.add(
                SearchTextRow(conversation_id=conversation.id, seq=row.seq, text=searchable)
            )
        session.flush()
        return _message(row, turn.content), conversation

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

    def history(self, conversation_id: str) -> Iterator[Message]:
        """Every turn in order, archived ones read back from their blocks."""
        with self._db.transaction() as session:
            self._row(session, conversation_id)
        after = 0
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
            for turn in _archive.unpack(
                conversation_id, block.first_seq, block.last_seq, block.payload, block.checksum
            ):
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
        """The conversation, its latest summary and its live turns, read together.

        Only the columns the context engine uses are read: this runs before
        every request, and its cost follows the live window, not the history.
        """
        with self._db.transaction() as session:
            row = self._row(session, conversation_id)
            summary_row = session.execute(
                select(SummaryRow.text, SummaryRow.through_seq, SummaryRow.token_count)
                .where(
                    SummaryRow.conversation_id == conversation_id,
                    SummaryRow.through_seq == row.archived_through_seq,
                )
                .limit(1)
            ).one_or_none()
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
                    MessageRow.seq > row.archived_through_seq,
                )
                .order_by(MessageRow.seq)
            ).all()
        summary = None
        if summary_row is not None:
            # Its token count (summary header included) was stored when it was made.
            summary = SummaryPart(
                summary_row.text, summary_row.through_seq, summary_row.token_count
            )
        turns = [
            LiveTurn(r.seq, r.role, r.content or [], r.token_count, r.status, r.model) for r in rows
        ]
        return LiveState(row, summary, turns)

    def compact(self, state: LiveState, archive_count: int) -> Compaction | None:
        """Archive the first ``archive_count`` live turns and store a new summary.

        The summarizer runs outside any transaction. The archive is written in
        one transaction under the conversation's lock, from the rows as they
        are then, and only if nobody compacted meanwhile (else None). If the
        summarizer fails, :class:`SummarizerFailed` is raised (after trying
        ``summarizer_fallback``) and nothing changes.
        """
        from .errors import SummarizerFailed

        turns = state.turns[:archive_count]
        if not turns:
            return None
        previous = state.summary.text if state.summary else None
        handed = [SummaryTurn(t.seq, t.role, t.content) for t in turns]
        result: SummaryResult | None = None
        failures = []
        for summarizer in (self.summarizer, self.summarizer_fallback):
            if summarizer is None:
                continue
            try:
                made = summarizer.summarize(previous, handed)
            except Exception as exc:
                failures.append(f"{type(summarizer).__name__}: {type(exc).__name__}: {exc}")
                logger.warning(
                    "summarizer %s failed for %s: %s",
                    type(summarizer).__name__,
                    state.row.id,
                    exc,
                    extra={"conversation_id": state.row.id},
                )
                continue
            result = made if isinstance(made, SummaryResult) else SummaryResult(str(made))
            # A summary is derived text, not history: NULs (which PostgreSQL's
            # text cannot hold) may go.
            result = replace(result, text=result.text.replace("\x00", "\ufffd"))
            if result.text.strip():
                break
            failures.append(f"{type(summarizer).__name__}: returned an empty summary")
            result = None
        if result is None:
            raise SummarizerFailed(
                f"could not summarize turns {turns[0].seq}-{turns[-1].seq} of {state.row.id}; "
                f"they stay live ({'; '.join(failures)})"
            )
        return self._write_archive(state, turns[0].seq, turns[-1].seq, result)

    def _write_archive(
        self, state: LiveState, first_seq: int, last_seq: int, result: SummaryResult
    ) -> Compaction | None:
        conversation_id = state.row.id
        summary_tokens = self.count_text(
            summary_block(SummaryPart(result.text, last_seq, 0))["text"]
        )
        with self._db.transaction(write=True) as session:
            row = self._row(session, conversation_id, lock=True)
            if row.archived_through_seq != state.row.archived_through_seq:
                return None  # another process compacted first; its summary stands
            in_range = (
                MessageRow.conversation_id == conversation_id,
                MessageRow.seq.between(first_seq, last_seq),
            )
            rows = session.scalars(
                select(MessageRow).where(*in_range).order_by(MessageRow.seq)
            ).all()
            turns = [_archive.ArchivedTurn(r.seq, r.role, r.content or []) for r in rows]
            packed = _archive.pack(turns)
            # Prove the block reads back to exactly these turns before the rows let go.
            unpacked = _archive.unpack(
                conversation_id, packed.first_seq, packed.last_seq, packed.payload, packed.checksum
            )
            if unpacked != turns:
                raise AssertionError("archive block does not read back to its turns")
            now = utcnow()
            session.add(
                ArchiveBlockRow(
                    conversation_id=conversation_id,
                    first_seq=packed.first_seq,
                    last_seq=packed.last_seq,
                    payload=packed.payload,
                    checksum=packed.checksum,
                    raw_bytes=packed.raw_bytes,
                    created_at=now,
                )
            )
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
            packed.raw_bytes,
            len(packed.payload),
        )

    def update_conversation(self, conversation_id: str, changes: dict[str, Any]) -> ConversationRow:
        with self._db.transaction(write=True) as session:
            row = self._row(session, conversation_id, lock=True)
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            return row

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
                            failed=row.status != "complete",
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
