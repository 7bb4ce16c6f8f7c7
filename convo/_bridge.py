"""How the async store runs convo's one core on an event loop.

convo's core is written once, as plain (sync) code: the decisions in the pure
modules, the SQL in the store, the send path in ``_sending``. The async store
runs that same code inside SQLAlchemy's ``greenlet_spawn``, the mechanism
SQLAlchemy's own ``AsyncSession`` is built on. Inside it, every place the core
would block awaits instead, on the event loop's thread:

* the database: the engine's driver is async (aiosqlite, psycopg async,
  aiomysql), and SQLAlchemy awaits each of its calls;
* the API: the store's client is :class:`AwaitingClient`, whose methods await
  an ``anthropic.AsyncAnthropic`` (:func:`wait`);
* CPU-heavy work on large inputs (counting a long turn, zlib on an archive
  block) is handed to a worker thread by :func:`off_loop`, so it never holds
  the loop; small inputs stay inline, where a thread hop would cost more.

No thread runs convo's logic and nothing is copied between the two faces: the
async classes in ``_aio`` are one-line adapters over the sync ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Final, TypeVar

__all__ = [
    "AwaitingClient",
    "awaiting_summarizer",
    "cleanup",
    "in_event_loop",
    "off_loop",
    "rough_size",
    "run",
    "wait",
]

_T = TypeVar("_T")

#: Inputs at least this large (characters or bytes) are processed off the loop.
OFF_LOOP_BYTES: Final = 256 * 1024


def in_event_loop() -> bool:
    """True when this code runs for the async store (inside ``greenlet_spawn``)."""
    try:
        from sqlalchemy.util.concurrency import in_greenlet
    except ImportError:  # pragma: no cover - SQLAlchemy without its asyncio support
        return False
    return in_greenlet()


async def run(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Run sync core code ``fn`` on the event loop, its waits awaited.

    It runs as a task of its own, so a cancellation reaches it exactly once:
    the core then cleans up as it does for Ctrl-C in the sync store (marks the
    turn failed or keeps the partial reply, releases the claim), and that
    cleanup awaits the database in peace. ``asyncio.timeout`` and
    ``task.cancel()`` cancel once; anyio (Starlette, FastAPI) cancels again at
    every await of a cancelled scope. Either way the caller's await ends with
    ``CancelledError`` and the cleanup runs to its end in the core's task.
    """
    from sqlalchemy.util import greenlet_spawn

    core = asyncio.ensure_future(greenlet_spawn(fn, *args, **kwargs))
    try:
        return await asyncio.shield(core)
    except asyncio.CancelledError:
        if not core.done():
            core.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(core)  # its cleanup; anyio may cut this wait short
        raise


async def cleanup(fn: Callable[..., _T], /, *args: Any) -> _T:
    """Run core cleanup code ``fn`` (storing a reply, releasing a claim): never cancelled.

    If the caller is cancelled meanwhile it stops waiting, and ``fn`` finishes
    in its own task.
    """
    from sqlalchemy.util import greenlet_spawn

    return await asyncio.shield(asyncio.ensure_future(greenlet_spawn(fn, *args)))


def wait(awaitable: Awaitable[_T]) -> _T:
    """From core code run by :func:`run`: await ``awaitable`` and return its result."""
    try:
        from sqlalchemy.util import await_
    except ImportError:  # SQLAlchemy 2.0 names it await_only
        from sqlalchemy.util import await_only as await_

    return await_(awaitable)


def off_loop(fn: Callable[..., _T], size: int, /, *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)``; for the async store, in a worker thread when ``size`` is large.

    ``size`` is the input's size in characters or bytes (:func:`rough_size`).
    """
    if size >= OFF_LOOP_BYTES and in_event_loop():
        return wait(asyncio.to_thread(fn, *args, **kwargs))
    return fn(*args, **kwargs)


def rough_size(value: Any) -> int:
    """Characters in the strings of a JSON-like value: what counting or packing it costs."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(rough_size(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(rough_size(item) for item in value)
    return 8


class AwaitingClient:
    """An ``anthropic.AsyncAnthropic`` with the sync client's interface, for core code.

    ``messages.create`` and ``messages.count_tokens`` await the async client;
    ``messages.stream`` gives a stream whose events are awaited one by one.
    Attributes the core only reads (``api_key``, ``base_url``, ...) pass through.
    """

    def __init__(self, client: Any) -> None:
        self.async_client = client
        self.messages = _AwaitingMessages(client.messages)

    def with_options(self, **options: Any) -> AwaitingClient:
        return AwaitingClient(self.async_client.with_options(**options))

    def with_middleware(self, *middleware: Any) -> AwaitingClient:
        """The client with more middleware; each given by its ``handle_async``."""
        return AwaitingClient(
            self.async_client.with_middleware(*(m.handle_async for m in middleware))
        )

    def close(self) -> None:
        wait(self.async_client.close())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.async_client, name)


class _AwaitingMessages:
    def __init__(self, messages: Any) -> None:
        self._messages = messages

    def create(self, **params: Any) -> Any:
        return wait(self._messages.create(**params))

    def count_tokens(self, **params: Any) -> Any:
        return wait(self._messages.count_tokens(**params))

    def stream(self, **params: Any) -> _AwaitingStreamManager:
        return _AwaitingStreamManager(self._messages.stream(**params))


class _AwaitingStreamManager:
    def __init__(self, manager: Any) -> None:
        self._manager = manager

    def __enter__(self) -> _AwaitingStream:
        return _AwaitingStream(wait(self._manager.__aenter__()))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        wait(self._manager.__aexit__(exc_type, exc, tb))


class _AwaitingStream:
    """An ``AsyncMessageStream`` read as the sync ``MessageStream`` is."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[Any]:
        events = self._stream.__aiter__()
        while True:
            try:
                event = wait(events.__anext__())
            except StopAsyncIteration:
                return
            yield event

    def get_final_message(self) -> Any:
        return wait(self._stream.get_final_message())

    def close(self) -> None:
        wait(self._stream.close())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def awaiting_summarizer(summarizer: Any) -> Any:
    """A summarizer whose ``summarize`` is a coroutine function, as core code calls it."""
    if summarizer is None or not inspect.iscoroutinefunction(
        getattr(summarizer, "summarize", None)
    ):
        return summarizer
    return _AwaitingSummarizer(summarizer)


class _AwaitingSummarizer:
    def __init__(self, summarizer: Any) -> None:
        self._summarizer = summarizer

    def summarize(self, *args: Any, **kwargs: Any) -> Any:
        return wait(self._summarizer.summarize(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._summarizer, name)
