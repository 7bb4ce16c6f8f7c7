"""One behavioural suite for both APIs: the sync store and the async store.

A test module opts in with ``pytestmark = pytest.mark.faces`` and builds its
stores with :func:`ConversationStore` from here instead of ``convo``'s. Each of
its tests then runs twice (``[sync]`` and ``[async]``, see ``conftest``):

* sync: the real :class:`convo.ConversationStore`;
* async: a real :class:`convo.AsyncConversationStore` with an
  ``anthropic.AsyncAnthropic`` client, on an event loop in a thread of its own.
  :class:`Blocking` lets the sync test code drive it: each ``await``-able call
  is submitted to that loop and waited for. Several test threads calling at
  once make concurrent tasks on the one loop, as a web app's requests would.

The adapter holds no convo logic: it only awaits what the async API returns.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any

import anthropic

import convo
from convo._bridge import run
from convo._database import Database

#: The face the current test runs (set by the ``face`` fixture in conftest).
FACE = "sync"


def ConversationStore(url: Any = None, **options: Any) -> Any:
    """The store of the current face, opened on ``url`` with ``options``."""
    if FACE == "sync":
        return convo.ConversationStore(url, **options)
    return BlockingStore(url, **options)


def async_client(client: anthropic.Anthropic) -> anthropic.AsyncAnthropic:
    """An ``AsyncAnthropic`` with the settings of a sync test client."""
    return anthropic.AsyncAnthropic(
        base_url=str(client.base_url),
        api_key=client.api_key,
        max_retries=client.max_retries,
        timeout=client.timeout,
    )


class _Loop:
    """An event loop running in a daemon thread; :meth:`call` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        # A bound, so that a loop that died (a KeyboardInterrupt inside it) fails the test.
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=600)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class Blocking:
    """An async convo object, driven from sync code through its loop."""

    def __init__(self, loop: _Loop, target: Any) -> None:
        self._loop = loop
        self._target = target

    def __getattr__(self, name: str) -> Any:
        try:
            value = getattr(self._target, name)
        except AttributeError:
            return self._inside(name)
        if name in ("stream", "regenerate_stream"):
            return lambda *args, **kwargs: BlockingStream(self._loop, value(*args, **kwargs))
        if inspect.isasyncgenfunction(value):
            return lambda *args, **kwargs: iter(self._loop.call(_collect(value(*args, **kwargs))))
        if inspect.iscoroutinefunction(value):
            return lambda *args, **kwargs: self._wrap(self._loop.call(value(*args, **kwargs)))
        return value

    def _inside(self, name: str) -> Any:
        """What the async API does not offer, for white-box tests: raise AttributeError."""
        raise AttributeError(f"{type(self._target).__name__} has no attribute {name!r}")

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, convo.AsyncConversation):
            return Blocking(self._loop, value)
        if isinstance(value, list):
            return [self._wrap(item) for item in value]
        return value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Blocking) and other._target == self._target

    def __hash__(self) -> int:
        return hash(self._target)

    def __repr__(self) -> str:
        return f"Blocking({self._target!r})"


class BlockingStore(Blocking):
    """An :class:`convo.AsyncConversationStore` on a loop of its own."""

    def __init__(self, url: Any = None, **options: Any) -> None:
        client = options.get("client")
        self._made_client: anthropic.AsyncAnthropic | None = None
        self._database: _TestDatabase | None = None
        if isinstance(client, anthropic.Anthropic):
            options["client"] = self._made_client = async_client(client)
        loop = _Loop()
        try:
            target = convo.AsyncConversationStore(url, **options)
            loop.call(target.open())
        except BaseException:
            loop.stop()
            raise
        super().__init__(loop, target)

    @property
    def client(self) -> Any:
        return self._target.client

    @property
    def database(self) -> _TestDatabase:
        """The store's database, for white-box tests (see :class:`_TestDatabase`)."""
        if self._database is None:
            self._database = _TestDatabase(self._target.core.database)
        return self._database

    def __setattr__(self, name: str, value: Any) -> None:
        # A test replacing a setting or part of the store (its rate limiter, say)
        # replaces it in the core the async store runs.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._target.core, name, value)

    def _inside(self, name: str) -> Any:
        """For white-box tests, the core the async store runs (see :class:`OnLoop`)."""
        return getattr(OnLoop(self._loop, self._target.core), name)

    @property
    def records(self) -> OnLoop:
        return OnLoop(self._loop, self._target.core.records)

    @property
    def turns(self) -> OnLoop:
        return OnLoop(self._loop, self._target.core.turns)

    def close(self) -> None:
        if self._database is not None:
            self._database.close()
        try:
            self._loop.call(self._target.aclose())
            if self._made_client is not None:
                self._loop.call(self._made_client.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> BlockingStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class OnLoop:
    """A part of the core the async store runs, for white-box tests: its methods run on
    the store's loop through the bridge, as the async store runs them."""

    def __init__(self, loop: _Loop, target: Any) -> None:
        self._loop = loop
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            # A generator reads the database as it goes: read it all here, on the loop.
            return iter(list(result)) if inspect.isgenerator(result) else result

        return lambda *args, **kwargs: self._loop.call(run(call, *args, **kwargs))


class _TestDatabase:
    """The async store's database as white-box tests use it.

    Its ``engine`` is the store's own (events hooked on it fire inside the store's
    statements, to inject faults); ``transaction()`` opens a sync session on the
    same URL, for reading and damaging rows directly.
    """

    def __init__(self, database: Database) -> None:
        self._database = database
        self._direct = Database(database.url)

    @property
    def engine(self) -> Any:
        return self._database.engine

    def transaction(self, *, write: bool = False) -> Any:
        return self._direct.transaction(write=write)

    def close(self) -> None:
        self._direct.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._database, name)


class BlockingStream:
    """An :class:`convo.AsyncConversationStream` read from sync code."""

    def __init__(self, loop: _Loop, stream: convo.AsyncConversationStream) -> None:
        self._loop = loop
        self._stream = stream

    @property
    def message(self) -> Any:
        return self._stream.message

    def __enter__(self) -> BlockingStream:
        self._loop.call(self._stream.__aenter__())
        return self

    def __iter__(self) -> Iterator[str]:
        while True:
            try:
                yield self._loop.call(self._stream.__anext__())
            except StopAsyncIteration:
                return

    @property
    def text_stream(self) -> Iterator[str]:
        return iter(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.call(self._stream.__aexit__(exc_type, exc, tb))


async def _collect(items: Any) -> list[Any]:
    return [item async for item in items]
