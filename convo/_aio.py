"""``AsyncConversationStore``: the same store, awaited.

Every method here is a one-line adapter: it runs the sync method of the same
name on the event loop through ``_bridge.run`` (SQLAlchemy's ``greenlet_spawn``),
where the database driver, the ``AsyncAnthropic`` client and the limiter's
waits are awaited. So the async store has the same tables, claims, rules and
errors as the sync one, by construction: there is one core, not two.

What differs lives in :class:`_AsyncCore`, the sync store as the async one
runs it: an async database driver, an :class:`~convo._bridge.AwaitingClient`
over ``AsyncAnthropic``, an :class:`~convo._ratelimit.AsyncRateLimiter` and a
heartbeat on an asyncio task (:class:`TaskHeartbeat`).
"""

from __future__ import annotations

import asyncio
import builtins
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ._bridge import AwaitingClient, awaiting_summarizer, cleanup, run
from ._conversation import Conversation
from ._heartbeat import Heartbeat
from ._ratelimit import AsyncRateLimiter
from ._store import DEFAULT_LIST_LIMIT, ConversationStore
from .errors import InvalidInput

if TYPE_CHECKING:
    from sqlalchemy import URL

    from ._message import Message
    from ._sending import ConversationStream

__all__ = ["AsyncConversation", "AsyncConversationStore", "AsyncConversationStream"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class TaskHeartbeat(Heartbeat):
    """The heartbeat on an asyncio task (the async store); ticks run through the bridge."""

    def __init__(
        self,
        renew: Callable[[], bool],
        *,
        lease: float,
        deadline: float | None,
        name: str,
    ) -> None:
        super().__init__(renew, lease=lease, deadline=deadline, name=name)
        self._stopped = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"convo-claim-{name}")

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopped.wait(), self.seconds_to_wait())
                return
            except TimeoutError:
                await run(self.tick)

    def stop(self) -> None:
        self._stopped.set()


class _AsyncCore(ConversationStore):
    """The sync store as the async store runs it (see the module docstring)."""

    _asynchronous = True
    _limiter_class = AsyncRateLimiter
    _heartbeat_class = TaskHeartbeat

    def _adopt_client(self, client: Any) -> Any:
        if isinstance(client, AwaitingClient):
            return client
        create = getattr(getattr(client, "messages", None), "create", None)
        if create is None or not inspect.iscoroutinefunction(inspect.unwrap(create)):
            raise InvalidInput(
                "client",
                "must be an anthropic.AsyncAnthropic for AsyncConversationStore "
                f"(got {type(client).__name__}; use ConversationStore with a sync client)",
            )
        return AwaitingClient(client)

    def _default_client(self, **options: Any) -> Any:
        import anthropic

        return AwaitingClient(anthropic.AsyncAnthropic(**options))


def _awaited(
    method: Callable[Concatenate[Any, _P], _R],
) -> Callable[Concatenate[Any, _P], Coroutine[Any, Any, _R]]:
    """An async method running the sync ``method`` of the wrapped object (``_sync``)."""

    async def awaited(self: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        target = await self._target()
        return await run(method, target, *args, **kwargs)

    awaited.__name__ = method.__name__
    awaited.__qualname__ = method.__qualname__
    awaited.__doc__ = method.__doc__
    return awaited


def _awaited_conversation(
    method: Callable[Concatenate[Any, _P], Conversation],
) -> Callable[Concatenate[AsyncConversationStore, _P], Coroutine[Any, Any, AsyncConversation]]:
    """An async store method running the sync ``method``; its conversation, async."""

    async def awaited(
        self: AsyncConversationStore, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> AsyncConversation:
        core = await self._target()
        return self._wrap(await run(method, core, *args, **kwargs))

    awaited.__name__ = method.__name__
    awaited.__qualname__ = method.__qualname__
    awaited.__doc__ = method.__doc__
    return awaited


class AsyncConversationStore:
    """Conversations in SQL for asyncio apps: :class:`ConversationStore`, awaited.

    Same URL, same options (keyword-only), same tables: sync and async
    processes can share one database, and an async sender and a sync sender
    on one conversation exclude each other. ``client`` is an
    ``anthropic.AsyncAnthropic`` (by default one is made on first use).
    ``summarizer`` may be sync or have an ``async def summarize``.

    The database is opened (SQLite: created or upgraded) on first use, or by
    ``await store.open()``. Use it as ``async with AsyncConversationStore(...)
    as store:``, or call ``await store.aclose()``. Needs the ``async`` extra
    (``pip install 'convo-store[async]'``; with ``postgres`` or ``mysql`` for
    those servers).
    """

    def __init__(self, url: str | URL | None = None, **options: Any) -> None:
        for name in ("summarizer", "summarizer_fallback"):
            if name in options:
                options[name] = awaiting_summarizer(options[name])
        self._core = _AsyncCore(url, **options)
        self._opened = False
        self._opening = asyncio.Lock()

    async def open(self) -> AsyncConversationStore:
        """Check (SQLite: create or upgrade) the schema and replay the outbox, once."""
        if not self._opened:
            async with self._opening:
                if not self._opened:
                    await run(self._core.open)
                    self._opened = True
        return self

    async def _target(self) -> ConversationStore:
        await self.open()
        return self._core

    async def aclose(self) -> None:
        """Close the database connections (and the client the store made, if any)."""
        await run(self._core.close)

    async def __aenter__(self) -> AsyncConversationStore:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncConversationStore({self.url!r})"

    @property
    def url(self) -> str:
        """The database URL, with any password masked."""
        return self._core.url

    def __getattr__(self, name: str) -> Any:
        # The store's settings (model, token_budget, send_lease, ...), as the sync store has.
        if name.startswith("_"):
            raise AttributeError(name)
        return _data_attribute(self, self._core, name)

    if TYPE_CHECKING:
        model: str
        token_budget: int | None
        low_water: float
        summarizer_input_tokens: int
        send_lease: float
        send_timeout: float | None
        pool_size: int | None

    @property
    def client(self) -> Any:
        """The ``anthropic.AsyncAnthropic`` client."""
        return self._core.client.async_client

    @property
    def core(self) -> ConversationStore:
        """The sync store this one runs (call its methods only through this store)."""
        return self._core

    def _wrap(self, conversation: Conversation) -> AsyncConversation:
        return AsyncConversation(self, conversation)

    create = _awaited_conversation(ConversationStore.create)
    get = _awaited_conversation(ConversationStore.get)
    find = _awaited_conversation(ConversationStore.find)

    async def latest(self, *, user_id: str | None = None) -> AsyncConversation | None:
        """The conversation with the most recent activity, if any."""
        core = await self._target()
        found = await run(core.latest, user_id=user_id)
        return None if found is None else self._wrap(found)

    async def list(
        self,
        *,
        user_id: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
        before: str | None = None,
    ) -> builtins.list[AsyncConversation]:
        """Conversations, newest first (see :meth:`ConversationStore.list`)."""
        core = await self._target()
        found = await run(core.list, user_id=user_id, limit=limit, before=before)
        return [self._wrap(c) for c in found]

    async def iter_conversations(
        self, *, user_id: str | None = None, since: datetime | None = None
    ) -> AsyncIterator[AsyncConversation]:
        """Every conversation (optionally one user's, or active since a time), newest first."""
        core = await self._target()
        async for conversation in _aiter(core.iter_conversations(user_id=user_id, since=since)):
            yield self._wrap(conversation)

    search = _awaited(ConversationStore.search)
    recall = _awaited(ConversationStore.recall)
    usage = _awaited(ConversationStore.usage)
    prune = _awaited(ConversationStore.prune)
    verify = _awaited(ConversationStore.verify)
    delete = _awaited(ConversationStore.delete)
    delete_many = _awaited(ConversationStore.delete_many)
    message_total = _awaited(ConversationStore.message_total)
    pending_replies = _awaited(ConversationStore.pending_replies)
    replay_outbox = _awaited(ConversationStore.replay_outbox)
    calibration = _awaited(ConversationStore.calibration)


class AsyncConversation:
    """A stored conversation of an :class:`AsyncConversationStore`: :class:`Conversation`, awaited.

    Its attributes (``id``, ``title``, ``message_count``, ...) are the same
    snapshot; ``await conv.refresh()`` reloads them.
    """

    def __init__(self, store: AsyncConversationStore, conversation: Conversation) -> None:
        self.store = store
        self._sync = conversation

    async def _target(self) -> Conversation:
        return self._sync

    def __repr__(self) -> str:
        return repr(self._sync).replace("<Conversation", "<AsyncConversation", 1)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncConversation) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __getattr__(self, name: str) -> Any:
        # The snapshot's attributes (id, title, model, message_count, ...).
        return _data_attribute(self, self._sync, name)

    if TYPE_CHECKING:
        id: str
        user_id: str | None
        title: str | None
        model: str | None
        system: str | builtins.list[dict[str, Any]] | None
        token_budget: int | None
        metadata: dict[str, Any]
        created_at: datetime
        updated_at: datetime
        message_count: int
        archived_through_seq: int
        window_start_seq: int
        compaction_failures: int
        compaction_retry_at: datetime | None
        effective_model: str

    async def refresh(self) -> AsyncConversation:
        """Reload the attributes from the database."""
        await run(self._sync.refresh)
        return self

    add = _awaited(Conversation.add)
    extend = _awaited(Conversation.extend)
    history = _awaited(Conversation.history)
    edit = _awaited(Conversation.edit)
    delete_turn = _awaited(Conversation.delete_turn)
    regenerate = _awaited(Conversation.regenerate)
    update = _awaited(Conversation.update)
    budget = _awaited(Conversation.budget)
    window = _awaited(Conversation.window)
    recall = _awaited(Conversation.recall)
    context = _awaited(Conversation.context)
    compact = _awaited(Conversation.compact)
    record = _awaited(Conversation.record)
    send = _awaited(Conversation.send)
    exclude = _awaited(Conversation.exclude)
    include = _awaited(Conversation.include)
    release_claim = _awaited(Conversation.release_claim)
    summary = _awaited(Conversation.summary)

    async def iter_history(self) -> AsyncIterator[Message]:
        """Every turn in order, read a batch at a time."""
        async for message in _aiter(self._sync.iter_history()):
            yield message

    def stream(
        self, content: str | builtins.list[Any], *, key: str | None = None, **params: Any
    ) -> AsyncConversationStream:
        """Send a turn and stream the reply: ``async with conv.stream("hi") as s:``."""
        return AsyncConversationStream(lambda: self._sync.stream(content, key=key, **params))

    def regenerate_stream(self, **params: Any) -> AsyncConversationStream:
        """Regenerate the last reply (see ``Conversation.regenerate``), streaming the new one."""
        return AsyncConversationStream(lambda: self._sync.regenerate_stream(**params))


class AsyncConversationStream:
    """A streamed reply: ``async for text in s`` for the deltas; ``s.message`` when done.

    Leaving the ``async with`` block stores the reply, as the sync stream
    does: complete, or ``incomplete`` with what arrived if the stream broke
    off, was cut, or the task was cancelled (the claim is released then too).
    """

    def __init__(self, make: Callable[[], ConversationStream]) -> None:
        self._make = make
        self._sync: ConversationStream | None = None
        self._texts: Iterator[str] | None = None

    @property
    def message(self) -> Message | None:
        """The stored reply, once the block has ended."""
        return None if self._sync is None else self._sync.message

    async def __aenter__(self) -> AsyncConversationStream:
        def enter() -> None:
            self._sync = self._make()
            self._sync.__enter__()

        await run(enter)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._sync is not None
        await cleanup(self._sync.__exit__, exc_type, exc, tb)

    def __aiter__(self) -> AsyncConversationStream:
        return self

    async def __anext__(self) -> str:
        if self._sync is None:
            raise RuntimeError("use the stream inside its `async with` block")
        if self._texts is None:
            self._texts = iter(self._sync)
        text: str | None = await run(next, self._texts, None)
        if text is None:
            raise StopAsyncIteration
        return text

    @property
    def text_stream(self) -> AsyncConversationStream:
        return self


_END = object()


def _data_attribute(face: object, sync: object, name: str) -> Any:
    """``sync``'s attribute ``name`` if it is data; a method would block the loop."""
    value = getattr(sync, name)
    if callable(value):
        raise AttributeError(f"{type(face).__name__} has no attribute {name!r}")
    return value


async def _aiter(items: Iterator[Any]) -> AsyncIterator[Any]:
    """A sync iterator of core code, stepped on the loop one item at a time."""
    while True:
        item = await run(next, items, _END)
        if item is _END:
            return
        yield item
