"""``ConversationStore``: the public API of conversations stored in SQL.

The store holds the options and the parts it is made of, and each public
method is a short composition of them:

* ``records`` (:class:`~convo._records.Records`): every SQL statement;
* ``turns`` (:class:`~convo._turns.TurnMaker`): checking, redacting and counting
  turns and requests;
* the ``client``, the ``summarizer`` and the ``rate_limiter`` (``_ratelimit``);
* :class:`~convo._conversation.Conversation` for one conversation's turns,
  context window, compaction and sends.

The async store (``_aio``) runs this same class with an async driver, client,
limiter and heartbeat: the hooks ``_asynchronous``, ``_limiter_class``,
``_heartbeat_class``, ``_adopt_client`` and ``_default_client``.
"""

from __future__ import annotations

import builtins
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import URL

from ._budget import Calibration, default_model
from ._compaction import DEFAULT_SUMMARIZER_INPUT_TOKENS
from ._database import Database, mask, resolve_url
from ._heartbeat import Heartbeat, ThreadHeartbeat
from ._ids import PREFIX as ID_PREFIX
from ._ids import is_id_prefix, new_conversation_id
from ._models import (
    ConversationRow,
    utcnow,
)
from ._outbox import PendingReply
from ._pricing import PriceTable
from ._ratelimit import LimitedClient, RateLimiter
from ._recall import (
    DEFAULT_K,
    DEFAULT_RECALL,
    DEFAULT_SHARE,
    SCOPES,
    HitCache,
    RecallHit,
    query_terms,
)
from ._records import Compaction, Records
from ._redaction import Redactor
from ._schema import shipped_head, stored_revision
from ._search import SearchHit
from ._summarizer import ClaudeSummarizer, Summarizer
from ._tokens import TiktokenCounter, TokenCounter
from ._turns import TurnMaker, check_positive, check_text
from ._usage import GROUPINGS, GroupBy, UsageReport, summarize
from ._validate import check_duration, check_seconds, check_time
from .errors import ConversationNotFound, InvalidInput, MissingAPIKey

if TYPE_CHECKING:
    from ._conversation import Conversation

__all__ = ["Compaction", "ConversationStore"]

logger = logging.getLogger("convo")

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
#: Conversations read per round trip when walking them all.
PAGE: Final = 500


def _redactor(setting: Redactor | bool) -> Redactor | None:
    if isinstance(setting, Redactor):
        return setting
    return Redactor() if setting else None


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
    * ``send_timeout``: seconds a whole send may take, the SDK's retries
      included (default: none beyond the SDK's own timeouts); past it a call
      fails with :class:`SendTimedOut` and a stream is cut. See the README.
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
        self.model: str = model or default_model()
        self.token_budget = check_positive("token_budget", token_budget)
        if not 0.05 <= low_water <= 0.95:
            raise InvalidInput("low_water", f"must be between 0.05 and 0.95, not {low_water!r}")
        self.low_water = low_water
        checked = check_positive("summarizer_input_tokens", summarizer_input_tokens)
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
        self.exact_token_counts = exact_token_counts
        self.max_retries = check_positive("max_retries", max_retries) if max_retries else None
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
        #: The hits of recent request lookups (see ``_recall.HitCache``).
        self.recall_hits = HitCache()
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
        self.pool_size = check_positive("pool_size", pool_size)
        self._db = Database(
            self._url, echo=echo, asynchronous=self._asynchronous, pool_size=self.pool_size
        )
        #: Checking, redacting and counting turns and requests.
        self.turns = TurnMaker(
            self._db,
            self.token_counter,
            storage_redactor=self.storage_redactor,
            request_redactor=self.request_redactor,
        )
        #: Every SQL statement.
        self.records = Records(
            self._db,
            send_lease=self.send_lease,
            count_text=self.turns.count_text,
            auto_replay=auto_replay,
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
        if self.records.auto_replay:
            self.records.replay_outbox(quiet=True)

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

    def calibration(self, model: str) -> Calibration:
        """The token-count correction of ``model``, as learned so far."""
        return self.records.calibration(model)

    def pending_replies(self) -> builtins.list[PendingReply]:
        """Replies waiting in the outbox for this database (billed, not yet stored)."""
        return self.records.pending_replies()

    def replay_outbox(self, *, quiet: bool = False) -> int:
        """Write the outbox's pending replies into their conversations; return how many.

        A reply already stored (the same request id, or idempotency key) is
        not written again. With ``quiet``, a database still unavailable is not
        an error (the replies stay pending).
        """
        return self.records.replay_outbox(quiet=quiet)

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
            **self.turns.conversation_columns(
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
        self.records.insert_conversation(row)
        return Conversation(self, row)

    def get(self, conversation_id: str) -> Conversation:
        """The conversation with this id; :class:`ConversationNotFound` if there is none."""
        from ._conversation import Conversation

        return Conversation(self, self.records.conversation(conversation_id))

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

        check_positive("limit", limit)
        rows = self.records.newest(limit, user_id=user_id, before=before)
        return [Conversation(self, row) for row in rows]

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
            rows = self.records.newest(PAGE, user_id=user_id, since=since, before=before)
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
        check_positive("limit", limit)
        return self.records.search(
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
        check_positive("k", k)
        check_text("user_id", user_id, 255)
        return self.records.recall(terms, conversation_id=conversation_id, user_id=user_id, k=k)

    def message_total(self, *, user_id: str | None = None, since: datetime | None = None) -> int:
        """How many turns the conversations chosen by these filters hold."""
        check_time("since", since)
        return self.records.message_total(user_id=user_id, since=since)

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
        rows = self.records.inactive_since(utcnow() - older_than)
        return [Conversation(self, row) for row in rows]

    def delete_many(self, conversation_ids: Sequence[str]) -> tuple[int, int]:
        """Delete these conversations; returns (conversations, messages) deleted.

        One gone meanwhile is skipped.
        """
        conversations = messages = 0
        for conversation_id in conversation_ids:
            try:
                turns = self.records.conversation(conversation_id).last_seq
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
            faults.extend(self.records.verify_conversation(conv.id))
        return faults

    def delete(self, conversation_id: str) -> None:
        """Delete a conversation with all its turns, archive blocks and summaries."""
        self.records.delete_conversation(conversation_id)

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
        rows = self.records.with_id_prefix(prefix, FIND_CANDIDATES + 1)
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

        row = self.records.most_recent(user_id=user_id)
        return None if row is None else Conversation(self, row)

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
            self.records.conversation(conversation_id)  # ConversationNotFound
        return summarize(
            self.records.call_records(conversation_id, user_id, since),
            self.prices,
            group_by=group_by,
        )

    # -- calibration -------------------------------------------------------------
