"""``Conversation``: one stored conversation, its turns, and its next request."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Final

from ._budget import (
    DEFAULT_MAX_TOKENS,
    FACTOR_CEILING,
    effective_budget,
    reported_input_tokens,
)
from ._message import Message
from ._models import ConversationRow
from ._sending import ConversationStream
from ._sending import send as send_turn
from ._store import (
    Compaction,
    ConversationStore,
    LiveState,
    Turn,
    _check_metadata,
    _check_positive,
    _check_system,
    _check_text,
)
from ._window import (
    ContextWindow,
    assemble,
    count_breakpoints,
    json_tokens_text,
    plan_compaction,
    system_blocks,
)
from .errors import ContextTooLarge, InvalidInput, MessageTooLarge, SummarizerFailed

__all__ = ["Conversation"]

logger = logging.getLogger("convo")

#: Request parameters that take part in the prompt and so in the budget.
_PROMPT_PARAMS: Final = ("tools", "tool_choice", "output_config", "mcp_servers")
#: Parameters convo sets itself from the conversation.
_OWN_PARAMS: Final = ("messages", "system", "model")


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
        with self.store.database.transaction() as session:
            self._load(self.store._row(session, self.id))
        return self

    # -- turns ------------------------------------------------------------------

    def add(self, role: str, content: str | list[Any]) -> Message:
        """Append a turn without calling the API and return it as stored.

        ``content`` is a string or a list of Messages API content blocks (dicts
        or SDK objects). Raises :class:`InvalidMessage` naming the bad field,
        or :class:`MessageTooLarge` if the turn could never fit in a request;
        nothing is written then.
        """
        turn = self.store.make_turn(role, content)
        self._check_fits(turn.token_count)
        message, row = self.store.append(self.id, turn)
        self._load(row)
        return message

    def _check_fits(self, turn_tokens: int, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        model = self.effective_model
        budget = self.budget(max_tokens=max_tokens)
        raw = turn_tokens + self._system_tokens()
        if raw * FACTOR_CEILING <= budget:
            return  # fits by any plausible factor: no need to read the calibration
        calibration = self.store.calibration(model)
        needed = calibration.scale(raw)
        if needed > budget:
            raise MessageTooLarge(
                "content",
                f"needs about {needed:,} input tokens with the system prompt, more than the "
                f"budget of {budget:,} for one request to {model}; nothing was stored",
            )

    def history(self) -> list[Message]:
        """Every turn of the conversation, in order, archived ones included."""
        return list(self.store.history(self.id))

    def iter_history(self) -> Iterator[Message]:
        """Every turn, in order, read in batches: for very long conversations."""
        return self.store.history(self.id)

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
            changes["token_budget"] = _check_positive("token_budget", token_budget)
        if changes:
            self._load(self.store.update_conversation(self.id, changes))
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
        return sum(self.store.count_text(b.get("text", "")) for b in blocks)

    def window(self, *, compact: bool = True, **params: Any) -> ContextWindow:
        """The next request's context window, with its token accounting.

        With ``compact`` (the default), compacts first if the live turns would
        pass the budget; a summarizer failure is logged and noted in the
        window, whose oldest live turns are then left out of the request
        (they stay stored). ``params`` are the other request parameters
        (``max_tokens``, ``tools``, ...), which count against the budget.
        """
        for name in _OWN_PARAMS:
            if name in params:
                raise InvalidInput(name, "is set by convo from the conversation; do not pass it")
        max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS)
        _check_positive("max_tokens", max_tokens)
        model = self.effective_model
        budget = self.budget(max_tokens=max_tokens)
        calibration = self.store.calibration(model)
        prompt_params: dict[str, Any] = {k: params[k] for k in _PROMPT_PARAMS if k in params}
        extra_tokens = (
            self.store.count_text(json_tokens_text(prompt_params)) if prompt_params else 0
        )
        notes: list[str] = []
        state = self.store.live_state(self.id)
        self._load(state.row)
        if compact:
            done = self._maybe_compact(state, budget, calibration.effective_factor, extra_tokens)
            if isinstance(done, str):
                notes.append(done)
            elif done is not None:
                notes.append(f"compacted turns {done.first_seq}-{done.last_seq}")
                state = self.store.live_state(self.id)
                self._load(state.row)
        for _attempt in range(3):
            window = assemble(
                model=model,
                system=self.system,
                summary=state.summary,
                turns=state.turns,
                budget=budget,
                calibration=calibration,
                system_tokens=self._system_tokens(),
                extra_tokens=extra_tokens,
                user_breakpoints=count_breakpoints(prompt_params) + count_breakpoints(self.system),
                notes=notes,
            )
            if not self.store.exact_token_counts:
                break
            # Exact mode: the API's own count, which also calibrates; if it says
            # the window is over budget, lay it out again with what it taught us.
            exact = self._count_exactly(window.params, prompt_params)
            calibration = self.store.observe_usage(model, window.raw_tokens, exact)
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
                f"than the budget of {budget:,}; nothing was sent"
            )
        params_out: dict[str, Any] = {**window.params, "max_tokens": max_tokens}
        params_out.update({k: v for k, v in params.items() if k != "max_tokens"})
        window = _with_params(window, params_out)
        self._last_window = window
        return window

    def _count_exactly(self, request: dict[str, Any], prompt_params: dict[str, Any]) -> int:
        fields = {k: v for k, v in prompt_params.items() if k in ("tools", "tool_choice")}
        counted = self.store.client.messages.count_tokens(**request, **fields)
        return int(counted.input_tokens)

    def _maybe_compact(
        self,
        state: LiveState,
        budget: int,
        factor: float,
        extra_tokens: int,
        *,
        force: bool = False,
    ) -> Compaction | str | None:
        fixed = (
            self._system_tokens() + (state.summary.tokens if state.summary else 0) + extra_tokens
        )
        available = int(budget / factor) - fixed
        low_water = int(budget * self.store.low_water / factor) - fixed
        count = plan_compaction(state.turns, available=available, low_water=low_water, force=force)
        if not count:
            return None
        try:
            return self.store.compact(state, count)
        except SummarizerFailed as exc:
            if force:
                raise
            return f"compaction failed: {exc}"

    def context(self, **params: Any) -> dict[str, Any]:
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

    def compact(self) -> Compaction | None:
        """Archive the live turns before the latest exchange now, whatever the budget.

        Returns what was done, or None if there was nothing to archive. Raises
        :class:`SummarizerFailed` if no summary could be made (nothing changes).
        """
        model = self.effective_model
        budget = self.budget()
        factor = self.store.calibration(model).effective_factor
        state = self.store.live_state(self.id)
        done = self._maybe_compact(state, budget, factor, 0, force=True)
        self.refresh()
        return done if isinstance(done, Compaction) else None

    def record(self, response: Any, *, latency_ms: int | None = None) -> Message:
        """Store an API response (an SDK ``Message`` or a dict of its shape) as the assistant turn.

        Its usage, model, stop reason and request id are stored as reported.
        If it answers the request made from this object's last ``context()``,
        the reported input size also calibrates the model's token counts.
        """
        from ._response import turn_from_response

        turn = turn_from_response(self.store, response, latency_ms=latency_ms)
        window, self._last_window = self._last_window, None
        return self._store_reply(turn, window)

    def _store_reply(self, turn: Turn, window: ContextWindow | None) -> Message:
        """Append an assistant turn; a complete reply to ``window`` also calibrates."""
        message, row = self.store.append(self.id, turn)
        self._load(row)
        if window is not None and turn.status == "complete" and turn.usage:
            self.store.observe_usage(
                window.params["model"], window.raw_tokens, reported_input_tokens(turn.usage)
            )
        return message

    def send(self, content: str | list[Any], **params: Any) -> Message:
        """Send a user turn to Claude and return the stored reply.

        ``content`` is a string or a list of content blocks. ``params`` pass
        through to ``messages.create`` (``max_tokens``, ``tools``,
        ``tool_choice``, ``thinking``, ``stop_sequences``, ``metadata``, ...).
        The user turn is stored before the call; the reply after it, with its
        usage. A failed call raises :class:`APIError` and the user turn stays
        (it is sent again with the next turn); a second concurrent send on
        this conversation raises :class:`ConversationBusy`.
        """
        return send_turn(self, content, params)

    def stream(self, content: str | list[Any], **params: Any) -> ConversationStream:
        """Send a user turn and stream the reply::

            with conv.stream("Tell me a story") as reply:
                for text in reply:
                    print(text, end="", flush=True)
            reply.message  # the stored assistant turn

        A stream that breaks off keeps what arrived as an ``incomplete`` turn
        and raises :class:`StreamInterrupted`.
        """
        return ConversationStream(self, content, params)

    def summary(self) -> str | None:
        """The current rolling summary of the archived turns, if any."""
        state = self.store.live_state(self.id)
        return state.summary.text if state.summary else None


def _with_params(window: ContextWindow, params: dict[str, Any]) -> ContextWindow:
    return replace(window, params=params)
