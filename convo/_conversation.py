"""``Conversation``: one stored conversation, its turns, and its next request."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

from sqlalchemy import exc as sa_exc

from . import _compaction, _recall
from ._budget import (
    DEFAULT_MAX_TOKENS,
    FACTOR_CEILING,
    Calibration,
    effective_budget,
    informative,
    reported_input_tokens,
)
from ._editing import check_edit, deletion_span, regeneration_span
from ._message import Message
from ._models import ConversationRow
from ._records import Compaction, LiveState, WindowRead, WindowReader, check_free
from ._sending import ConversationStream, check_request_params
from ._sending import send as send_turn
from ._store import ConversationStore
from ._summarizer import ExtractiveSummarizer
from ._tokens import media_tokens
from ._turns import Turn, check_key, check_text
from ._window import (
    ContextWindow,
    LiveTurn,
    SummaryPart,
    as_sent,
    assemble,
    count_breakpoints,
    json_tokens_text,
    summary_block,
    system_blocks,
)
from .errors import (
    ContextTooLarge,
    DatabaseError,
    InvalidInput,
    InvalidMessage,
    MessageTooLarge,
    SummarizerFailed,
)

__all__ = ["Conversation"]

logger = logging.getLogger("convo")

#: Request parameters that take part in the prompt and so in the budget.
_PROMPT_PARAMS: Final = ("tools", "tool_choice", "output_config", "mcp_servers")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


class Conversation:
    """A stored conversation. Get one with ``store.create()`` or ``store.get(id)``.

    Its attributes are a snapshot taken when it was loaded (``refresh()``
    reloads them); its turns are always read from the database, so another
    process may append to the same conversation at the same time.
    """

    def __init__(self, store: ConversationStore, row: ConversationRow) -> None:
        self.store = store
        self._last_window: ContextWindow | None = None
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
        self.archived_through_seq: int = row.archived_through_seq
        #: Compaction state: where requests start (sticky between compactions), and
        #: the summarizer's failures in a row and when it is tried next (backoff).
        self.window_start_seq: int = row.window_start_seq
        self.compaction_failures: int = row.compaction_failures
        self.compaction_retry_at: datetime | None = row.compaction_retry_at

    def __repr__(self) -> str:
        return f"<Conversation {self.id} messages={self.message_count} title={self.title!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Conversation) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def effective_model(self) -> str:
        """The model requests use: the conversation's, else the store's default."""
        return self.model or self.store.model

    def refresh(self) -> Conversation:
        """Reload the attributes from the database."""
        self._load(self.store.records.conversation(self.id))
        return self

    # -- turns ------------------------------------------------------------------

    def add(
        self,
        role: str,
        content: str | list[Any],
        *,
        model: str | None = None,
        key: str | None = None,
    ) -> Message:
        """Append a turn without calling the API and return it as stored.

        ``content`` is a string or a list of Messages API content blocks (dicts
        or SDK objects). ``model`` is the model that wrote an assistant turn:
        its thinking blocks are sent back to that model only (a snapshot id
        counts as its alias). An assistant turn with thinking blocks and no
        ``model`` is recorded as written by the conversation's model. Raises
        :class:`InvalidMessage` naming the bad field, or
        :class:`MessageTooLarge` if the turn could never fit in a request;
        nothing is written then.

        ``key`` is an idempotency key (up to 100 characters, unique within the
        conversation): if a turn with this key is already stored (say the
        first attempt's commit was lost with the connection), that turn is
        returned and nothing is written.
        """
        turn = self._checked_turn(role, content, model, key)
        message, row = self.store.records.append(self.id, turn)
        self._load(row)
        return message

    def _checked_turn(
        self, role: object, content: object, model: object, key: object = None
    ) -> Turn:
        """A turn checked, redacted and counted as ``add`` stores it; writes nothing."""
        checked = check_text("model", model, 100)
        if checked is not None and role != "assistant":
            raise InvalidInput("model", "is recorded for assistant turns only")
        turn = self.store.turns.make_turn(role, content, model=checked, key=check_key(key))
        turn = _with_writer(turn, self.effective_model)
        self._check_fits(turn)
        return turn

    def extend(self, turns: Iterable[Any]) -> list[Message]:
        """Append many turns in one transaction and return them as stored.

        ``turns`` holds ``(role, content)`` pairs or ``{"role", "content"}``
        dicts (which may add ``"model"``, as ``add(model=)``). Each is checked
        exactly as :meth:`add` checks one (the same errors, their field
        prefixed with ``turns[i].``) before anything is written; a bad turn
        anywhere means nothing is stored. The turns get
        consecutive seqs. No compaction runs here: the next ``window()`` or
        ``compact()`` does it.
        """
        checked = []
        for index, item in enumerate(turns):
            try:
                turn = self._checked_turn(*_turn_fields(item))
            except InvalidInput as exc:
                raise type(exc)(f"turns[{index}].{exc.field}", exc.problem) from None
            checked.append(turn)
        if not checked:
            return []
        messages, row = self.store.records.append_many(self.id, checked)
        self._load(row)
        return messages

    def _check_fits(self, turn: Turn, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        """Raise :class:`MessageTooLarge` if ``turn`` could not fit in any request.

        Its image and PDF estimates are the API's own tokens: they are not scaled.
        """
        model = self.effective_model
        budget = self.budget(max_tokens=max_tokens)
        raw = turn.token_count + self._system_tokens()
        if raw * FACTOR_CEILING <= budget:
            return  # fits by any plausible factor: no need to read the calibration
        calibration = self.store.calibration(model)
        needed = calibration.scale(raw, media_tokens(turn.content))
        if needed > budget:
            raise MessageTooLarge(
                "content",
                f"needs about {needed:,} input tokens with the system prompt, more than the "
                f"budget of {budget:,} for one request to {model}; nothing was stored",
            )

    def history(self) -> list[Message]:
        """Every turn of the conversation, in order, archived ones included."""
        return list(self.store.records.history(self.id))

    def iter_history(self) -> Iterator[Message]:
        """Every turn, in order, read in batches: for very long conversations."""
        return self.store.records.history(self.id)

    def edit(self, seq: int, content: str | list[Any]) -> Message:
        """Replace the content of live turn ``seq`` (same role) and return it as stored.

        Archived turns cannot change (their block is checksummed and the summary
        was written from them). A turn's ``tool_use``/``tool_result`` ids must stay
        as they were, so the history stays valid. Raises :class:`InvalidInput`
        (nothing written) otherwise, :class:`ConversationBusy` during a send.
        """
        state = self.store.records.live_state(self.id)
        turn = self.store.turns.make_turn(_role_of(state, seq), content)
        check_edit(state.turns, seq, state.row.archived_through_seq, turn.content)
        self._check_fits(turn)
        self._load(self.store.records.replace_turn(self.id, seq, turn))
        return next(self.store.records.history(self.id, after=seq - 1))

    def delete_turn(self, seq: int) -> list[int]:
        """Delete live turn ``seq`` (with its tool partner, if any); later turns are renumbered.

        Returns the seqs that were deleted (numbered as they were before). A
        ``tool_use`` turn and the ``tool_result`` turn answering it go together.
        """
        state = self.store.records.live_state(self.id)
        span = deletion_span(state.turns, seq, state.row.archived_through_seq)
        self._load(self.store.records.delete_turns(self.id, span))
        return list(span)

    def regenerate(self, /, **params: Any) -> Message:
        """Send the user turn the last reply answered again; the new reply replaces it.

        The request is the one that turn's send made, without the old reply
        (and any assistant turns after that user turn). Those stay stored until
        the new reply is: they give way to it in the same commit. If the call
        fails, nothing changes; a reply that breaks off is kept as an
        ``excluded`` turn after the old one, which stays the answer.
        """
        return send_turn(self, None, params, retake=self._retake())

    def regenerate_stream(self, **params: Any) -> ConversationStream:
        """:meth:`regenerate`, streaming the new reply like :meth:`stream`."""
        return ConversationStream(self, None, params, retake=self._retake())

    def _retake(self) -> range:
        """The last user turn and the replies after it, which a regeneration retakes."""
        state = self.store.records.live_state(self.id)
        check_free(state.row)  # a send in flight: busy, whatever its last turn is now
        return regeneration_span(state.turns, state.row.archived_through_seq)

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
        given = {
            "title": title,
            "metadata": metadata,
            "model": model,
            "system": system,
            "token_budget": token_budget,
        }
        changes = self.store.turns.conversation_columns(
            {name: value for name, value in given.items() if not isinstance(value, _Unset)}
        )
        if changes:
            self._load(self.store.records.update_conversation(self.id, changes))
        return self

    # -- the context window -------------------------------------------------------

    def budget(self, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
        """Input tokens one request may carry (capped by the model's window)."""
        return effective_budget(
            self.token_budget or self.store.token_budget,
            model=self.effective_model,
            max_tokens=max_tokens,
        )

    def _system_tokens(self) -> int:
        blocks = system_blocks(self.system)
        return sum(self.store.turns.count_text(b.get("text", "")) for b in blocks)

    def window(self, /, *, compact: bool = True, **params: Any) -> ContextWindow:
        """The next request's context window, with its token accounting.

        Reads only what the request can carry: the newest live turns, newest
        first, until the budget is filled (its cost does not grow with the
        history or a backlog). With ``compact`` (the default), when turns
        must go it archives at most one chunk of the oldest live turns first
        (see ``convo._compaction``); live turns not archived yet are left out
        of the request (they stay stored) and the window's notes say so, as
        they say when a summary failed. ``params`` are the other request
        parameters (``max_tokens``, ``tools``, ...), which count against the
        budget.
        """
        return self._window(params, compact=compact)

    def _window(
        self,
        params: dict[str, Any],
        *,
        compact: bool = True,
        leaving_out: range | None = None,
        first_read: Callable[[WindowReader], WindowRead] | None = None,
    ) -> ContextWindow:
        """:meth:`window`; ``leaving_out``: live turns the request goes without (the
        replies a regeneration replaces); ``first_read``: reads the window the
        first time, in place of :meth:`Records.live_window` (a send reads it
        in the transaction that claims the conversation)."""
        max_tokens = check_request_params(params)
        model = self.effective_model
        budget = self.budget(max_tokens=max_tokens)
        calibration = self.store.calibration(model)
        prompt_params: dict[str, Any] = {k: params[k] for k in _PROMPT_PARAMS if k in params}
        extra_tokens = (
            self.store.turns.count_text(json_tokens_text(prompt_params)) if prompt_params else 0
        )
        # A top-level cache_control (automatic caching) is a breakpoint too.
        automatic = params.get("cache_control")
        notes: list[str] = []
        factor = calibration.effective_factor

        def plan_for(extra: int) -> tuple[ConversationRow, SummaryPart | None, _Plan]:
            nonlocal first_read
            read, first_read = first_read, None  # the first read only
            return self._plan(budget, factor, extra, leaving_out=leaving_out, read=read)

        row, summary, plan = plan_for(extra_tokens)
        reserved = self._recall_reserve(row, plan, budget, factor)
        if reserved:
            row, summary, plan = plan_for(extra_tokens + reserved)
        if compact and plan.start_seq > row.archived_through_seq + 1:
            done, note = self._compact_chunk(row, summary, plan.start_seq, plan.budget_raw)
            if note:
                notes.append(note)
            if done is not None:
                notes.append(f"compacted turns {done.first_seq}-{done.last_seq}")
                row, summary, plan = plan_for(extra_tokens + reserved)
                again = self._recall_reserve(row, plan, budget, factor)
                if again != reserved:
                    reserved = again
                    row, summary, plan = plan_for(extra_tokens + reserved)
        if compact and plan.start_seq > max(row.window_start_seq, row.archived_through_seq + 1):
            self.store.records.set_compaction_state(self.id, window_start_seq=plan.start_seq)
        backlog = range(row.archived_through_seq + 1, plan.start_seq)
        if backlog:
            notes.append(
                f"turns {backlog[0]}-{backlog[-1]} are not archived yet and are left out of "
                f"this request (stored; `conv.compact()` or `convo compact {self.id}` "
                "archives them now)"
            )
        system_tokens = self._system_tokens()
        omitted_from = backlog.start if backlog else None
        recall = self._recall_query(plan.turns, reserved)
        hits: list[_recall.RecallHit] | None = None
        for _attempt in range(4):
            window = assemble(
                model=model,
                system=self.system,
                summary=summary,
                turns=plan.turns,
                budget=budget,
                calibration=calibration,
                system_tokens=system_tokens,
                counter=self.store.turns.cached_counter,
                extra_tokens=extra_tokens + reserved,
                user_breakpoints=count_breakpoints(prompt_params) + count_breakpoints(self.system),
                cache_control=automatic if isinstance(automatic, dict) else None,
                notes=notes,
                omitted_from=omitted_from,
            )
            if window.estimated_tokens > budget and summary is not None:
                # The summary never makes a request fail: cut it to what fits.
                summary = self._fitted_summary(
                    summary, plan.turns, budget, calibration.effective_factor, extra_tokens
                )
                notes.append(
                    "the summary was cut to fit this request"
                    if summary is not None
                    else "the summary was left out: it did not fit with the newest exchange"
                )
                continue
            resent = _compaction.after_failed_turns(plan.turns)
            if window.estimated_tokens > budget and resent:
                # Failed user turns go with the next one while they fit; when
                # they cannot, they are left out loudly (stored, listed, logged).
                left = plan.turns[:resent]
                plan = replace(plan, turns=plan.turns[resent:])
                omitted_from = omitted_from or left[0].seq
                note = (
                    f"turns {left[0].seq}-{left[-1].seq} (ending with a user turn whose call "
                    "failed) do not fit together with the newest turn and are left out of "
                    "this request; they stay stored"
                )
                notes.append(note)
                logger.warning(
                    "conversation %s: %s", self.id, note, extra={"conversation_id": self.id}
                )
                continue
            if hits is None:
                hits = self._recall_hits(recall, window, row)
            window = _recall.fill(
                window,
                recall,
                hits,
                reserved=reserved,
                count_text=self.store.turns.count_text,
                calibration=calibration,
            )
            if not self.store.exact_token_counts:
                break
            # Exact mode: the API's own count, which also calibrates; if it says
            # the window is over budget, lay it out again with what it taught us.
            exact = self._count_exactly(window.params, prompt_params)
            if window.calibrates:
                calibration = self._calibrate(model, window.raw_tokens, exact) or calibration
            window = replace(window, estimated_tokens=exact)
            if exact <= budget:
                break
        if window.omitted_seqs:
            logger.warning(
                "conversation %s: turns %d-%d left out of the request to fit the budget",
                self.id,
                window.omitted_seqs[0],
                window.omitted_seqs[-1],
                extra={"conversation_id": self.id},
            )
        if window.estimated_tokens > budget:
            raise ContextTooLarge(
                f"conversation {self.id}: its newest exchange (turns {window.first_seq}-"
                f"{window.last_seq}) needs about {window.estimated_tokens:,} input tokens, more "
                f"than the budget of {budget:,}; nothing was sent (the turns stay stored, and a "
                "user turn is sent again with the next one)"
            )
        params_out: dict[str, Any] = {**window.params, "max_tokens": max_tokens}
        params_out.update({k: v for k, v in params.items() if k != "max_tokens"})
        window = _with_params(window, params_out)
        self._last_window = window
        return window

    def _recall_reserve(self, row: ConversationRow, plan: _Plan, budget: int, factor: float) -> int:
        # Every live turn is in the request only if it starts at the first live turn.
        live = sum(t.tokens for t in plan.turns)
        if plan.start_seq > row.archived_through_seq + 1:
            live += budget  # some live turns are left out
        return _recall.reserve(
            enabled=self.store.recall_enabled,
            budget=budget,
            share=self.store.recall_share,
            factor=factor,
            archived_through_seq=row.archived_through_seq,
            live_tokens=live,
            scope=self.store.recall_scope,
            user_id=self.user_id,
        )

    def _recall_query(self, turns: list[LiveTurn], reserved: int) -> _recall.RecallQuery | None:
        return _recall.plan(
            turns=turns,
            conversation_id=self.id,
            user_id=self.user_id,
            scope=self.store.recall_scope,
            reserve=reserved,
        )

    def _recall_hits(
        self, recall: _recall.RecallQuery | None, window: ContextWindow, row: ConversationRow
    ) -> list[_recall.RecallHit]:
        """The lookup's hits (remembered for this state of the conversation); a failure is
        logged and the request goes without recall."""
        if recall is None:
            return []
        query = recall.outside(window)
        key = (query, row.last_seq, row.archived_through_seq, row.updated_at)
        cached = self.store.recall_hits.get(key)
        if cached is not None:
            return cached
        try:
            hits = self.store.records.recall_for(query, _recall.REQUEST_K)
        except Exception as exc:  # recall is a help: it must never fail a send
            logger.warning(
                "conversation %s: recall failed, the request goes without it: %s",
                self.id,
                exc,
                extra={"conversation_id": self.id},
            )
            return []
        self.store.recall_hits.put(key, hits)
        return hits

    def recall(self, query: str, k: int = _recall.DEFAULT_K) -> list[_recall.RecallHit]:
        """The ``k`` turns of this conversation most relevant to ``query``, best first.

        See :meth:`ConversationStore.recall`.
        """
        return self.store.recall(query, conversation_id=self.id, k=k)

    def _count_exactly(self, request: dict[str, Any], prompt_params: dict[str, Any]) -> int:
        fields = {k: v for k, v in prompt_params.items() if k in ("tools", "tool_choice")}
        # What is counted is what would be sent (redacted if redact_requests is on),
        # under the store's rate limits.
        outbound = self.store.turns.outbound(request)
        counted = self.store.limited_client.messages.count_tokens(**outbound, **fields)
        return int(counted.input_tokens)

    def _plan(
        self,
        budget: int,
        factor: float,
        extra_tokens: int,
        *,
        force: bool = False,
        leaving_out: range | None = None,
        read: Callable[[WindowReader], WindowRead] | None = None,
    ) -> tuple[ConversationRow, SummaryPart | None, _Plan]:
        """The conversation, its summary, and where the request starts with its turns.

        One read (by ``read``, else :meth:`Records.live_window`): the newest
        live turns, newest first, only as many as can be sent (with ``force``:
        back to the newest exchange's start), less those in ``leaving_out``.
        """
        limits: dict[str, int] = {}

        def reader(
            row: ConversationRow, summary: SummaryPart | None
        ) -> tuple[int, Callable[[list[LiveTurn]], bool]]:
            fixed = self._system_tokens() + (summary.tokens if summary else 0) + extra_tokens
            available = int(budget / factor) - fixed
            limits["available"] = available
            limits["low_water"] = int(budget * self.store.low_water / factor) - fixed
            floor = row.archived_through_seq + 1
            if force:
                return floor, _compaction.has_start
            start = max(floor, row.window_start_seq)
            return start, lambda turns: _compaction.tail_is_enough(turns, available)

        if read is None:
            row, summary, tail, reached = self.store.records.live_window(self.id, reader)
        else:
            row, summary, tail, reached = read(reader)
        self._load(row)
        if leaving_out:
            tail = [turn for turn in tail if turn.seq not in leaving_out]
        if force:
            index = _compaction.newest_exchange(tail)
        else:
            # Planned on the turns as they would be sent: old tool results
            # cleared first (a long tool loop moves the start only when clearing
            # is not enough), and room made for what rendering adds.
            sent, added = as_sent(
                tail,
                model=self.effective_model,
                budget=budget,
                available=limits["available"],
                low_water=limits["low_water"],
                counter=self.store.turns.cached_counter,
            )
            index = _compaction.choose_start(
                sent,
                reached_start=reached,
                available=limits["available"] - added,
                low_water=limits["low_water"] - added,
            )
        kept = tail[index:]
        start_seq = kept[0].seq if kept else row.last_seq + 1
        return row, summary, _Plan(start_seq, kept, int(budget / factor))

    def _fitted_summary(
        self,
        summary: SummaryPart,
        turns: list[LiveTurn],
        budget: int,
        factor: float,
        extra_tokens: int,
    ) -> SummaryPart | None:
        newest = turns[_compaction.newest_exchange(turns) :]
        room = (
            int(budget / factor)
            - self._system_tokens()
            - extra_tokens
            - sum(t.tokens for t in newest)
        )
        header = self.store.turns.count_text(
            summary_block(SummaryPart("", summary.through_seq, 0))["text"]
        )
        text = _compaction.clip_text(summary.text, room - header, self.store.turns.count_text)
        if not text:
            return None
        tokens = self.store.turns.count_text(
            summary_block(SummaryPart(text, summary.through_seq, 0))["text"]
        )
        return SummaryPart(text, summary.through_seq, tokens)

    def _compact_chunk(
        self,
        row: ConversationRow,
        summary: SummaryPart | None,
        until_seq: int,
        budget_raw: int,
        *,
        force: bool = False,
    ) -> tuple[Compaction | None, str | None]:
        """Archive the next chunk of live turns before ``until_seq``: at most one
        summarizer request's worth. Returns what was done and a note for the window."""
        store = self.store
        backoff = _compaction.Backoff(row.compaction_failures, row.compaction_retry_at)
        now = _compaction.now()
        attempt = "primary" if force else backoff.attempt(now)
        fallback = store.summarizer_fallback
        if fallback is None and (attempt == "fallback" or backoff.failed(now).falls_back):
            fallback = ExtractiveSummarizer()
        if attempt == "wait" and fallback is None:
            return None, (
                f"compaction waits: the summarizer failed {backoff.failures} time(s) in a row; "
                f"next try after {backoff.retry_at:%Y-%m-%d %H:%M:%S} UTC"
                if backoff.retry_at
                else "compaction waits"
            )
        floor = row.archived_through_seq + 1
        allowance = _compaction.chunk_allowance(
            store.summarizer_input_tokens, summary.tokens if summary else 0
        )
        turns, reached = store.records.live_turns(
            self.id,
            first_seq=floor,
            last_seq=until_seq - 1,
            newest_first=False,
            enough=lambda head: _compaction.chunk_is_enough(head, allowance),
        )
        count = _compaction.next_chunk(turns, allowance=allowance, reached_end=reached)
        chunk = turns[:count]
        if not chunk:
            return None, None
        previous = summary.text if summary else None
        if previous and store.request_redactor is not None:
            # A summarizer's request leaves like any other: redacted (redact_requests).
            previous = store.request_redactor.redact_text(previous)
        try:
            made = _compaction.summarize_chunk(
                chunk,
                previous,
                target_tokens=_compaction.summary_target(budget_raw),
                primary=store.summarizer if attempt == "primary" else None,
                fallback=fallback,
                count=store.turns.count_text,
                redact=store.turns.redacted_for_summary,
            )
        except _compaction.SummaryNotMade as exc:
            failed = backoff.failed(now) if attempt == "primary" else backoff
            store.records.set_compaction_state(self.id, backoff=failed)
            message = (
                f"could not summarize turns {chunk[0].seq}-{chunk[-1].seq} of {self.id}; they "
                f"stay live ({exc.failure})"
            )
            if force:
                raise SummarizerFailed(message) from None  # reported once: raised, not logged
            logger.warning(
                "compaction failed for %s (failure %d in a row; next try after %s): %s",
                self.id,
                failed.failures,
                failed.retry_at,
                exc.failure,
                extra={"conversation_id": self.id},
            )
            return None, f"compaction failed: {message}"
        covered = chunk[: made.count]
        note = None
        new_backoff: _compaction.Backoff | None = None
        if made.failure is None and attempt == "primary":
            new_backoff = _compaction.Backoff() if backoff.failures else None
        elif attempt == "primary":
            new_backoff = backoff.failed(now)
        if made.fell_back:
            why = made.failure or (
                f"the summarizer failed {backoff.failures} time(s) in a row and backs off until "
                f"{backoff.retry_at:%Y-%m-%d %H:%M:%S} UTC"
                if backoff.retry_at
                else "the summarizer is backing off"
            )
            note = (
                f"turns {covered[0].seq}-{covered[-1].seq} were summarized by the fallback "
                f"{type(fallback).__name__}: {why}"
            )
            logger.warning("conversation %s: %s", self.id, note, extra={"conversation_id": self.id})
        done = store.records.write_chunk(
            self.id,
            archived_through_seq=row.archived_through_seq,
            last_seq=covered[-1].seq,
            result=made.result,
            backoff=new_backoff,
        )
        return done, note

    def context(self, /, **params: Any) -> dict[str, Any]:
        """Exactly the request parameters the next call would send.

        ``model``, ``max_tokens``, ``system`` and ``messages`` come from the
        conversation; other ``params`` (``tools``, ``thinking``, ...) are passed
        through. The result is valid for the Messages API and within budget.
        The last stored turn must be a user turn: add one first.
        """
        window = self.window(**params)
        messages = window.params["messages"]
        if not messages or messages[-1]["role"] != "user":
            raise InvalidInput(
                "conversation",
                f"{self.id} ends with an assistant turn; add a user turn before asking for "
                "the next request",
            )
        return window.params

    def compact(self, *, progress: Callable[[int, int], None] | None = None) -> Compaction | None:
        """Archive every live turn before the latest exchange now, whatever the budget.

        Works in chunks (one summarizer request each, at most
        ``summarizer_input_tokens``), each committed as soon as its summary is
        made: a crash keeps the chunks done. ``progress(done, total)`` is
        called after each chunk with turns archived so far and in all. Returns
        what was done (first to last turn archived, the final summary), or None
        if there was nothing to archive. Raises :class:`SummarizerFailed` if a
        chunk's summary could not be made (the chunks before it stay done).
        """
        model = self.effective_model
        budget = self.budget()
        factor = self.store.calibration(model).effective_factor
        chunks: list[Compaction] = []
        total: int | None = None
        first_floor = 0
        while True:
            row, summary, plan = self._plan(budget, factor, 0, force=True)
            if total is None:
                first_floor = row.archived_through_seq
                total = max(plan.start_seq - 1 - first_floor, 0)
            if plan.start_seq <= row.archived_through_seq + 1:
                break
            done, _note = self._compact_chunk(
                row, summary, plan.start_seq, plan.budget_raw, force=True
            )
            if done is None:
                continue  # another process compacted meanwhile: read again
            chunks.append(done)
            if progress is not None:
                progress(min(done.last_seq - first_floor, total), total)
        self.refresh()
        if not chunks:
            return None
        kinds = dict.fromkeys(c.summarizer for c in chunks)
        return Compaction(
            chunks[0].first_seq,
            chunks[-1].last_seq,
            chunks[-1].summary,
            "+".join(kinds),
            sum(c.raw_bytes for c in chunks),
            sum(c.stored_bytes for c in chunks),
        )

    def record(self, response: Any, *, latency_ms: int | None = None) -> Message:
        """Store an API response (an SDK ``Message`` or a dict of its shape) as the assistant turn.

        Its usage, model, stop reason and request id are stored as reported.
        If it answers the request made from this object's last ``context()``,
        the reported input size also calibrates the model's token counts.
        """
        from ._response import turn_from_response

        turn = turn_from_response(self.store, response, latency_ms=latency_ms)
        window, self._last_window = self._last_window, None
        requested = window.params["model"] if window is not None else self.effective_model
        return self._store_reply(_with_writer(turn, requested), window)

    def _store_reply(
        self,
        turn: Turn,
        window: ContextWindow | None,
        *,
        release: str | None = None,
        replacing: range | None = None,
    ) -> Message:
        """Append an assistant turn (ending claim ``release``, in place of the last
        turns ``replacing``); a complete reply calibrates.

        Calibration never fails the call: the reply is stored by then, and a
        database error while calibrating (a deadlock between first sends to a
        new model, say) is only logged. An observation that would not move a
        settled factor, or one too small to teach anything, is not written: every
        send on a model would otherwise write that model's one row, which all
        conversations share.
        """
        message, row = self.store.records.append(
            self.id, turn, release=release, replacing=replacing
        )
        self._load(row)
        if window is not None and window.calibrates and turn.status == "complete" and turn.usage:
            actual = reported_input_tokens(turn.usage)
            known = window.calibration
            if informative(window.raw_tokens, actual) and (
                known is None or not known.settled_by(window.raw_tokens, actual)
            ):
                self._calibrate(window.params["model"], window.raw_tokens, actual)
        return message

    def _calibrate(self, model: str, raw_tokens: int, actual_tokens: int) -> Calibration | None:
        """Fold one observation into the model's calibration; a database error is logged.

        Calibration never fails a call: the reply is stored by then, and the
        next observation does the same work (MariaDB, for one, can report a
        deadlock when two processes write a model's first row at once).
        """
        try:
            return self.store.records.observe_usage(model, raw_tokens, actual_tokens)
        except (DatabaseError, sa_exc.SQLAlchemyError) as exc:
            logger.warning(
                "conversation %s: calibration of %s skipped: %s",
                self.id,
                model,
                exc,
                extra={"conversation_id": self.id},
            )
            return None

    def send(
        self, /, content: str | list[Any], *, key: str | None = None, **params: Any
    ) -> Message:
        """Send a user turn to Claude and return the stored reply.

        ``content`` is a string or a list of content blocks. ``params`` pass
        through to ``messages.create`` (``max_tokens``, ``tools``,
        ``tool_choice``, ``thinking``, ``stop_sequences``, ``metadata``, ...).
        The user turn is stored before the call; the reply after it, with its
        usage. A failed call raises :class:`APIError` and the user turn stays
        (it is sent again with the next turn); a second concurrent send on
        this conversation raises :class:`ConversationBusy`.

        Every parameter is checked before anything is written or sent.
        ``key`` is an idempotency key for the user turn: a retry with the
        same key never stores the turn twice; if its reply is stored too, that
        reply is returned without calling the API. If the database fails once
        the reply has arrived, :class:`ReplyNotStored` carries the reply, which
        is kept in the store's outbox and written on the next use of the store.
        """
        return send_turn(self, content, params, key=key)

    def exclude(self, seq: int) -> None:
        """Leave live turn ``seq`` out of every request from now on; it stays stored.

        For a turn the API rejects (an :class:`APIError` with a 400 names the
        turns behind the message it refused in ``turn_seqs``), which would
        otherwise make every later send fail. Its status becomes
        ``"excluded"``; :meth:`include` undoes it.
        """
        self.store.records.set_excluded(self.id, seq, True)

    def include(self, seq: int) -> None:
        """Send an excluded turn again from the next request on."""
        self.store.records.set_excluded(self.id, seq, False)

    def release_claim(self, *, force: bool = False) -> bool:
        """Clear a send's claim on this conversation, left by a sender that died.

        Only with ``force=True`` (a live sender's claim would be cleared too,
        letting a second send in). Returns True if there was a claim.
        """
        if not force:
            raise InvalidInput(
                "force", "release_claim clears any sender's claim: pass force=True to mean it"
            )
        return self.store.records.release(self.id)

    def stream(
        self, content: str | list[Any], *, key: str | None = None, **params: Any
    ) -> ConversationStream:
        """Send a user turn and stream the reply::

            with conv.stream("Tell me a story") as reply:
                for text in reply:
                    print(text, end="", flush=True)
            reply.message  # the stored assistant turn

        A stream that breaks off keeps what arrived as an ``incomplete`` turn
        and raises :class:`StreamInterrupted`.
        """
        return ConversationStream(self, content, params, key=key)

    def summary(self) -> str | None:
        """The current rolling summary of the archived turns, if any."""
        _row, summary = self.store.records.window_head(self.id)
        return summary.text if summary else None


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where the next request starts (its first seq), its turns, and the raw budget."""

    start_seq: int
    turns: list[LiveTurn]
    budget_raw: int


def _with_writer(turn: Turn, model: str) -> Turn:
    """``turn``, recording ``model`` as its writer if it is an assistant turn with thinking
    blocks and no model of its own: thinking is replayed only to the model that wrote it,
    and one of unknown origin is never replayed."""
    if turn.role != "assistant" or turn.model is not None:
        return turn
    if not any(b.get("type") in ("thinking", "redacted_thinking") for b in turn.content):
        return turn
    return replace(turn, model=model)


def _role_of(state: LiveState, seq: int) -> str:
    return next((t.role for t in state.turns if t.seq == seq), "user")


def _turn_fields(item: object) -> tuple[object, object, object]:
    """One entry of ``extend``'s list: a ``(role, content)`` pair or a dict; with its model."""
    if isinstance(item, Mapping):
        unknown = set(item) - {"role", "content", "model"}
        if unknown:
            raise InvalidMessage(sorted(unknown)[0], "is not a turn field (role, content, model)")
        if "role" not in item or "content" not in item:
            raise InvalidMessage("role" if "role" not in item else "content", "is required")
        return item["role"], item["content"], item.get("model")
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1], None
    raise InvalidMessage(
        "turn", f"must be a (role, content) pair or a dict, not {type(item).__name__}"
    )


def _with_params(window: ContextWindow, params: dict[str, Any]) -> ContextWindow:
    return replace(window, params=params)
