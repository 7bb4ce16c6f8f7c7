"""Every read and write of convo's rows: the SQL statements, written once.

:class:`Records` runs them through a :class:`~convo._database.Database`, one
transaction each (its ``transaction()`` context manager). The async store
runs this same code with an async driver (see ``_bridge``). It takes turns
already checked and counted (``_turns``) and returns rows, messages and plain
data; it knows nothing of the API client, token counters or redaction.

Appending a turn locks the conversation's row (``SELECT ... FOR UPDATE`` on
PostgreSQL and MySQL, the write lock on SQLite), numbers the turn
``last_seq + 1`` and commits both in one transaction: any number of threads,
processes and hosts can append to one conversation and every turn is stored
once, numbered without gaps. Compaction takes the same lock to move turns
into an archive block, so it never races an append.

Replies the database could not take wait in the outbox (``_outbox``): every
write first writes those it owes (``replay_outbox``), when ``auto_replay``.
"""

from __future__ import annotations

import builtins
import functools
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

from sqlalchemy import Text, cast, delete, func, insert, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from . import _archive, _verify
from ._bridge import off_loop, rough_size
from ._budget import Calibration
from ._compaction import (
    CHUNK_BATCH,
    MAX_BLOCK_BYTES,
    MAX_BLOCK_TURNS,
    TAIL_BATCH,
    Backoff,
)
from ._content import Block, validate_role
from ._database import Database
from ._ids import is_conversation_id
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
from ._recall import RecallHit, RecallQuery
from ._search import SearchHit, searchable_text
from ._search import recall as run_recall
from ._search import search as run_search
from ._summarizer import SummaryResult
from ._turns import MESSAGE_COLUMNS, AlreadyAnswered, Turn, check_positive, reply_key
from ._usage import CallRecord
from ._window import LiveTurn, SummaryPart, summary_block
from .errors import (
    ArchiveCorrupted,
    ConversationBusy,
    ConversationNotFound,
    DatabaseUnavailable,
    InvalidInput,
)

__all__ = ["Claimed", "Compaction", "LiveState", "Records", "WindowRead", "WindowReader"]

logger = logging.getLogger("convo")
#: How long a model's calibration read from the database is used before reading it again.
CALIBRATION_TTL_S: Final = 30.0
_clock = time.monotonic


def check_free(conversation: ConversationRow) -> None:
    """Raise :class:`ConversationBusy` while a send's claim holds the conversation."""
    if conversation.busy_until is not None and conversation.busy_until > utcnow():
        raise ConversationBusy(conversation.id, conversation.busy_until)


#: Rows fetched per round trip when reading a long history.
HISTORY_BATCH = 1_000

_Row = TypeVar("_Row", ArchiveBlockRow, SummaryRow)

#: Says, given the conversation and its summary, from which seq a request's
#: turns are read, and when those read newest first are enough (see
#: :meth:`Records.live_turns`).
WindowReader = Callable[
    [ConversationRow, SummaryPart | None],
    tuple[int, Callable[[builtins.list[LiveTurn]], bool]],
]
#: What a request is laid out from: the conversation, its summary, its newest
#: live turns oldest first, and whether they reach back to the first seq asked.
WindowRead = tuple[ConversationRow, SummaryPart | None, builtins.list[LiveTurn], bool]


@dataclass(frozen=True, slots=True)
class Claimed:
    """A send's claim (:meth:`Records.claim_and_append`): its user turn, the
    conversation, the claim's owner, and the window read in the same transaction."""

    message: Message
    row: ConversationRow
    owner: str
    window: WindowRead | None


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


#: The tables behind the hot inserts, for Core statements.
_MESSAGES: Final = MessageRow.metadata.tables[MessageRow.__tablename__]
_SEARCH_TEXTS: Final = SearchTextRow.metadata.tables[SearchTextRow.__tablename__]


def _insert_turn_rows(
    session: Session, rows: Sequence[dict[str, Any]], contents: Sequence[Any]
) -> None:
    """Insert turns (their column values) and the search text of their ``contents``.

    Core inserts on the tables (executemany), not the ORM's bulk path: many
    turns cost one round trip, and one turn no ORM bookkeeping.
    """
    session.execute(insert(_MESSAGES), rows)
    searchable = [
        {"conversation_id": row["conversation_id"], "seq": row["seq"], "text": text}
        for row, content in zip(rows, contents, strict=True)
        if (text := searchable_text(content))
    ]
    if searchable:
        session.execute(insert(_SEARCH_TEXTS), searchable)


class ImportWriter:
    """The SQL of one import, inside its one transaction (:meth:`Records.importing`)."""

    #: Turns inserted per statement.
    BATCH: Final = 1_000

    def __init__(self, session: Session) -> None:
        self._session = session

    def exists(self, conversation_id: str) -> bool:
        return self._session.get(ConversationRow, conversation_id) is not None

    def write(
        self,
        conversation: ConversationRow,
        turns: Sequence[MessageRow],
        contents: Sequence[Any],
        blocks: Sequence[ArchiveBlockRow],
        summaries: Sequence[SummaryRow],
    ) -> None:
        """One conversation: its row, turns (``contents``: each turn's content, for
        the search text of archived turns too), archive blocks and summaries."""
        session = self._session
        session.add(conversation)
        session.flush()
        for start in range(0, len(turns), self.BATCH):
            batch = turns[start : start + self.BATCH]
            _insert_turn_rows(
                session,
                [{column: getattr(row, column) for column in MESSAGE_COLUMNS} for row in batch],
                contents[start : start + self.BATCH],
            )
        session.add_all(blocks)
        session.add_all(summaries)
        session.flush()


def _row_values(message: Message) -> dict[str, Any]:
    """A stored turn as the values of its ``convo_messages`` row."""
    return {column: getattr(message, column) for column in MESSAGE_COLUMNS}


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


class Records:
    """convo's rows in one database: every statement the stores run.

    ``send_lease`` is how long a send's claim lasts unless renewed;
    ``count_text`` counts a summary's tokens; ``auto_replay`` writes the
    outbox's pending replies before each append.
    """

    def __init__(
        self,
        database: Database,
        *,
        send_lease: float,
        count_text: Callable[[str], int],
        auto_replay: bool,
    ) -> None:
        self._db = database
        self._url = database.url
        self.url = database.url.render_as_string(hide_password=True)
        self.send_lease = send_lease
        self.count_text = count_text
        self.auto_replay = auto_replay
        #: model -> (calibration, monotonic time until which it is used unread)
        self._calibrations: dict[str, tuple[Calibration, float]] = {}

    # -- conversations -------------------------------------------------------

    def insert_conversation(self, row: ConversationRow) -> None:
        with self._db.transaction(write=True, brief=True) as session:
            session.add(row)

    def conversation(self, conversation_id: str) -> ConversationRow:
        """The conversation's row; :class:`ConversationNotFound` if there is none."""
        with self._db.transaction(brief=True) as session:
            return self.row(session, conversation_id)

    def newest(
        self,
        limit: int,
        *,
        user_id: str | None = None,
        since: datetime | None = None,
        before: str | None = None,
    ) -> builtins.list[ConversationRow]:
        """Up to ``limit`` conversations, newest first: one user's, active since, before an id."""
        query = select(ConversationRow).order_by(ConversationRow.id.desc()).limit(limit)
        if user_id is not None:
            query = query.where(ConversationRow.user_id == user_id)
        if since is not None:
            query = query.where(ConversationRow.updated_at >= since)
        if before is not None:
            query = query.where(ConversationRow.id < before)
        with self._db.transaction() as session:
            return builtins.list(session.scalars(query).all())

    def with_id_prefix(self, prefix: str, limit: int) -> builtins.list[ConversationRow]:
        """Up to ``limit`` conversations whose id starts with ``prefix``, in id order."""
        query = (
            select(ConversationRow)
            .where(ConversationRow.id.startswith(prefix, autoescape=True))
            .order_by(ConversationRow.id)  # a whole id sorts before the longer ones
            .limit(limit)
        )
        with self._db.transaction() as session:
            return builtins.list(session.scalars(query).all())

    def most_recent(self, *, user_id: str | None = None) -> ConversationRow | None:
        """The conversation with the most recent activity (optionally one user's)."""
        query = (
            select(ConversationRow)
            .order_by(ConversationRow.updated_at.desc(), ConversationRow.id.desc())
            .limit(1)
        )
        if user_id is not None:
            query = query.where(ConversationRow.user_id == user_id)
        with self._db.transaction() as session:
            return session.scalars(query).one_or_none()

    def inactive_since(self, cutoff: datetime) -> builtins.list[ConversationRow]:
        """The conversations with no activity since ``cutoff``, least recent first."""
        with self._db.transaction() as session:
            return builtins.list(
                session.scalars(
                    select(ConversationRow)
                    .where(ConversationRow.updated_at < cutoff)
                    .order_by(ConversationRow.updated_at)
                ).all()
            )

    def message_total(self, *, user_id: str | None = None, since: datetime | None = None) -> int:
        """How many turns the conversations chosen by these filters hold."""
        query = select(func.coalesce(func.sum(ConversationRow.last_seq), 0))
        if user_id is not None:
            query = query.where(ConversationRow.user_id == user_id)
        if since is not None:
            query = query.where(ConversationRow.updated_at >= since)
        with self._db.transaction() as session:
            return int(session.scalar(query) or 0)

    def delete_conversation(self, conversation_id: str) -> None:
        """Delete a conversation with all its turns, archive blocks and summaries."""
        with self._db.transaction(write=True) as session:
            self.row(session, conversation_id, lock=True)
            for table in (SearchTextRow, MessageRow, ArchiveBlockRow, SummaryRow):
                session.execute(delete(table).where(table.conversation_id == conversation_id))
            session.execute(delete(ConversationRow).where(ConversationRow.id == conversation_id))

    def search(
        self, query: str, *, conversation_id: str | None, **filters: Any
    ) -> builtins.list[SearchHit]:
        """``_search.search`` in one transaction (the conversation checked first, if given)."""
        with self._db.transaction() as session:
            if conversation_id is not None:
                self.row(session, conversation_id)
            return run_search(session, query, conversation_id=conversation_id, **filters)

    def recall(
        self,
        terms: builtins.list[str],
        *,
        conversation_id: str | None,
        user_id: str | None,
        k: int,
    ) -> builtins.list[RecallHit]:
        """``_search.recall`` in one transaction (the conversation checked first, if given)."""
        with self._db.transaction() as session:
            if conversation_id is not None:
                self.row(session, conversation_id)
            return run_recall(session, terms, conversation_id=conversation_id, user_id=user_id, k=k)

    # -- turns -----------------------------------------------------------------

    @staticmethod
    def row(session: Session, conversation_id: str, *, lock: bool = False) -> ConversationRow:
        """The conversation's row (``lock``: for update), or ConversationNotFound."""
        if not is_conversation_id(conversation_id):
            raise ConversationNotFound(str(conversation_id))
        query = select(ConversationRow).where(ConversationRow.id == conversation_id)
        if lock:
            query = query.with_for_update()
        row = session.scalars(query.execution_options(populate_existing=True)).one_or_none()
        if row is None:
            raise ConversationNotFound(conversation_id)
        return row

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
            self._delete_locked(session, conversation, seqs)
            return conversation

    def _delete_locked(self, session: Session, conversation: ConversationRow, seqs: range) -> None:
        """Delete turns ``seqs`` of a locked conversation; later turns move down."""
        for table in (SearchTextRow, MessageRow):
            where = (table.conversation_id == conversation.id,)
            session.execute(delete(table).where(*where, table.seq.between(seqs[0], seqs[-1])))
            if seqs[-1] == conversation.last_seq:
                continue  # nothing after them to renumber
            # Two steps through negative numbers: a unique (conversation, seq)
            # must hold after every row on every backend.
            later = (*where, table.seq > seqs[-1])
            session.execute(update(table).where(*later).values(seq=-table.seq))
            session.execute(
                update(table).where(*where, table.seq < 0).values(seq=-table.seq - len(seqs))
            )
        conversation.last_seq -= len(seqs)
        conversation.updated_at = utcnow()

    def _editable(self, session: Session, conversation_id: str, seqs: range) -> ConversationRow:
        """The locked row of a conversation whose turns ``seqs`` may change now."""
        conversation = self.row(session, conversation_id, lock=True)
        check_free(conversation)
        if seqs[0] <= conversation.archived_through_seq or seqs[-1] > conversation.last_seq:
            raise InvalidInput(
                "seq", f"turns {seqs[0]}-{seqs[-1]} are not all live turns of {conversation_id}"
            )
        return conversation

    def append(
        self,
        conversation_id: str,
        turn: Turn,
        *,
        release: str | None = None,
        replacing: range | None = None,
    ) -> tuple[Message, ConversationRow]:
        """Append ``turn`` as the conversation's next seq, atomically.

        A turn with an idempotency key that is already stored is not written
        again: the stored one is returned. ``release``: the owner of a send's
        claim, cleared in the same transaction (a send's reply and the end of
        its claim are one commit). ``replacing``: the last turns, which the new
        one replaces in the same commit (a regenerated reply); if other turns
        were added after them meanwhile, they are kept and the turn goes last.
        """
        if self.auto_replay:
            self.replay_outbox(quiet=True)
        with self._db.transaction(write=True, brief=True) as session:
            conversation = self.row(session, conversation_id, lock=True)
            if release is not None and conversation.busy_owner == release:
                conversation.busy_until = None
                conversation.busy_owner = None
            existing = self._keyed(session, conversation_id, turn.key)
            if existing is not None:
                return existing, conversation
            if replacing:
                if replacing[-1] == conversation.last_seq:
                    self._delete_locked(session, conversation, replacing)
                else:
                    logger.warning(
                        "conversation %s: turns were added during the regeneration; the "
                        "replies %d-%d it replaces are kept, and the new reply goes last",
                        conversation_id,
                        replacing[0],
                        replacing[-1],
                        extra={"conversation_id": conversation_id},
                    )
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
        self, conversation_id: str, turn: Turn, *, reader: WindowReader | None = None
    ) -> Claimed:
        """Claim the conversation for one send and append its user turn, atomically.

        Raises :class:`ConversationBusy` (writing nothing) while another
        send's claim holds. The claim's owner token is for :meth:`release`.
        With an idempotency key already stored, the stored user turn is claimed
        again instead (its reply is then sent for anew), or, if its reply is
        stored too, :class:`AlreadyAnswered` carries that reply. With
        ``reader``, the request's window is read in the same transaction, as
        :meth:`live_window` reads it: a send makes one trip less.
        """
        if self.auto_replay:
            self.replay_outbox(quiet=True)
        with self._db.transaction(write=True, brief=True) as session:
            conversation = self.row(session, conversation_id, lock=True)
            check_free(conversation)
            existing = self._keyed(session, conversation_id, turn.key)
            if existing is not None and turn.key is not None:
                reply = self._keyed(session, conversation_id, reply_key(turn.key))
                if reply is not None:
                    raise AlreadyAnswered(reply)
            owner = self._claim_locked(conversation)
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
                message, row = existing, conversation
            else:
                message, row = self._append_locked(session, conversation, turn)
            window = None if reader is None else self._read_window(session, row, reader)
            return Claimed(message, row, owner, window)

    def claim(self, conversation_id: str, *, last_seq: int) -> tuple[ConversationRow, str]:
        """Claim the conversation for a send of a turn already stored (a regeneration).

        Raises :class:`ConversationBusy` while another send's claim holds, and
        :class:`InvalidInput` if the conversation no longer ends at ``last_seq``
        (it changed since the caller read it). Returns the row and the owner.
        """
        if self.auto_replay:
            self.replay_outbox(quiet=True)
        with self._db.transaction(write=True, brief=True) as session:
            conversation = self.row(session, conversation_id, lock=True)
            check_free(conversation)
            if conversation.last_seq != last_seq:
                raise InvalidInput(
                    "conversation",
                    f"{conversation_id} changed (it now ends at turn {conversation.last_seq}, "
                    f"not {last_seq}); nothing was sent, try again",
                )
            return conversation, self._claim_locked(conversation)

    def _claim_locked(self, conversation: ConversationRow) -> str:
        """Claim a locked conversation for one send; the claim's owner token."""
        owner = secrets.token_hex(8)
        conversation.busy_until = utcnow() + timedelta(seconds=self.send_lease)
        conversation.busy_owner = owner
        return owner

    def renew(self, conversation_id: str, owner: str) -> bool:
        """Extend a live send's claim by one lease; False if it is no longer the owner's."""
        with self._db.transaction(write=True, brief=True) as session:
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
        with self._db.transaction(write=True, brief=True) as session:
            conversation = self.row(session, conversation_id, lock=True)
            if conversation.busy_owner is None and conversation.busy_until is None:
                return False
            if owner is not None and conversation.busy_owner != owner:
                return False
            conversation.busy_until = None
            conversation.busy_owner = None
            return True

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
                conversation = self.row(session, entry.conversation_id, lock=True)
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
            conversation = self.row(session, conversation_id, lock=True)
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
        _insert_turn_rows(
            session,
            [{**_row_values(m), "key": t.key} for m, t in zip(messages, turns, strict=True)],
            [m.content for m in messages],
        )
        return messages

    @contextmanager
    def importing(self) -> Iterator[ImportWriter]:
        """The writes of one import, all in one transaction (all or nothing)."""
        with self._db.transaction(write=True) as session:
            yield ImportWriter(session)

    def set_excluded(self, conversation_id: str, seq: int, excluded: bool) -> None:
        """Mark a live turn excluded from requests (or include it again); it stays stored."""
        check_positive("seq", seq)
        with self._db.transaction(write=True) as session:
            conversation = self.row(session, conversation_id, lock=True)
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
        with self._db.transaction(write=True, brief=True) as session:
            session.execute(
                update(MessageRow)
                .where(MessageRow.conversation_id == conversation_id, MessageRow.seq == seq)
                .values(**values)
            )

    def history(self, conversation_id: str, *, after: int = 0) -> Iterator[Message]:
        """Every turn (after seq ``after``) in order, archived ones read back from their blocks."""
        with self._db.transaction() as session:
            self.row(session, conversation_id)
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

    def live_state(self, conversation_id: str) -> LiveState:
        """The conversation, its latest summary and all its live turns, read together.

        Reads every live turn: for tools and tests. Requests read only what
        they can send (:meth:`window_head`, :meth:`live_turns`).
        """
        with self._db.transaction() as session:
            row = self.row(session, conversation_id)
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
            row = self.row(session, conversation_id)
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

    def live_window(self, conversation_id: str, reader: WindowReader) -> WindowRead:
        """The conversation, its summary and its newest live turns, in one read.

        ``reader(row, summary)`` says from which seq on, and when the turns read
        newest first are enough (see :meth:`live_turns`).
        """
        with self._db.transaction(brief=True) as session:
            return self._read_window(session, self.row(session, conversation_id), reader)

    def _read_window(
        self, session: Session, row: ConversationRow, reader: WindowReader
    ) -> WindowRead:
        summary = self._summary(session, row)
        first_seq, enough = reader(row, summary)
        turns, reached = self._read_turns(session, row.id, first_seq, row.last_seq, True, enough)
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
            row = self.row(session, conversation_id, lock=True)
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
            row = self.row(session, conversation_id, lock=True)
            for key, value in changes.items():
                setattr(row, key, value)
            row.updated_at = utcnow()
            return row

    def call_records(
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

    def calibration(self, model: str) -> Calibration:
        """The token-count correction of ``model``, as learned so far.

        Read at most every ``CALIBRATION_TTL_S`` seconds per model (every
        request needs it; it moves slowly), and again after this store
        writes an observation.
        """
        known = self._calibrations.get(model)
        if known is not None and _clock() < known[1]:
            return known[0]
        with self._db.transaction(brief=True) as session:
            row = session.get(CalibrationRow, model)
            found = Calibration(row.factor, row.samples) if row else Calibration()
        return self._remember_calibration(model, found)

    def _remember_calibration(self, model: str, calibration: Calibration) -> Calibration:
        self._calibrations[model] = (calibration, _clock() + CALIBRATION_TTL_S)
        return calibration

    def observe_usage(self, model: str, raw_tokens: int, actual_tokens: int) -> Calibration:
        """Fold one request's reported input size into ``model``'s calibration."""
        for _ in range(3):
            try:
                with self._db.transaction(write=True, brief=True) as session:
                    row = session.scalars(
                        select(CalibrationRow)
                        .where(CalibrationRow.model == model)
                        .with_for_update()
                        .execution_options(populate_existing=True)
                    ).one_or_none()
                    before = Calibration(row.factor, row.samples) if row else Calibration()
                    after = before.observe(raw_tokens, actual_tokens)
                    if after is before:
                        return self._remember_calibration(model, before)
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
                # Read again next time: the database may store it rounded (MariaDB's
                # FLOAT), and every process must see the same factor.
                self._calibrations.pop(model, None)
                return after
            except sa_exc.IntegrityError:
                continue  # another process inserted the first row: read it and fold again
        return self.calibration(model)

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

    def verify_conversation(self, conversation_id: str) -> builtins.list[str]:
        # Content is read as the stored text, so an undecodable value is a finding.
        with self._db.transaction() as session:
            row = self.row(session, conversation_id)
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
