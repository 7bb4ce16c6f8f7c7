"""The async store's SQLite connection: aiosqlite, one thread hop per statement at most.

aiosqlite gives each SQLite connection a thread of its own and runs every call
there: opening a cursor, executing, fetching, closing the cursor. Each call is
one hop to that thread and one back to the event loop, which SQLAlchemy makes
four times for every statement. Most of an async send's own time on SQLite
went to those hops (64 per send), not to SQLite.

:class:`Connection` is an ``aiosqlite.Connection`` whose cursors run a whole
statement in one hop: execute, fetch its rows (up to :data:`FIRST_ROWS` of
them; the rest, if any, when asked for) and close. A ``BEGIN`` goes with the
transaction's first statement, in its hop (an error it meets, such as a lock
that stays taken, is raised there). A rollback or commit with no transaction
open (the pool's reset of a connection already committed) makes no hop at
all. Each hop still holds the thread only for SQLite's own work, so the event
loop stays free, as with plain aiosqlite.

A brief transaction (``Database.transaction(brief=True)``: a send's claim
and window, its reply, a claim's renewal) runs its statements on the event
loop's thread, with no hop: they are a few indexed statements, which cost
SQLite microseconds, where each hop costs a round trip through two threads
and lets other tasks in while the transaction holds SQLite's write lock. Its
BEGIN IMMEDIATE is tried without waiting; if another process holds the write
lock, the wait happens on the connection's thread as before. Its COMMIT, which
writes the log, is always a hop.

The engine opens these through SQLAlchemy's documented ``async_creator``
(:func:`opener`), with the connection arguments SQLAlchemy's SQLite dialect
derives from the URL.
"""

from __future__ import annotations

import re
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import Any, Final

import aiosqlite

from ._database import sqlite_busy

__all__ = ["FIRST_ROWS", "Connection", "StatementCursor", "opener"]

#: Rows an execute fetches in its own hop; a larger result is fetched on demand.
FIRST_ROWS: Final = 1024
#: The statements that open a transaction (convo's engine issues them itself).
_BEGIN: Final = re.compile(
    r"\s*BEGIN(\s+(DEFERRED|IMMEDIATE|EXCLUSIVE))?(\s+TRANSACTION)?\s*;?\s*", re.IGNORECASE
)
#: A BEGIN that takes the write lock at once, so may wait for another process.
_TAKES_WRITE_LOCK: Final = re.compile(r"IMMEDIATE|EXCLUSIVE", re.IGNORECASE)


class StatementCursor:
    """An aiosqlite-shaped cursor that runs each statement, with its rows, in one hop
    (none in a brief transaction: see :meth:`Connection.run`)."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._cursor: sqlite3.Cursor | None = None  # open only while rows remain
        self._rows: deque[Any] = deque()
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def __aenter__(self) -> StatementCursor:
        return self

    def __await__(self) -> Generator[Any, None, StatementCursor]:
        # ``await connection.cursor()``, as SQLAlchemy 2.0 opens one: the cursor itself.
        return self.__aenter__().__await__()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def execute(self, sql: str, parameters: Any = ()) -> StatementCursor:
        if not parameters and _BEGIN.fullmatch(sql):
            await self.close()
            self.description, self.rowcount, self.lastrowid = None, -1, None
            self._connection.defer_begin(sql)
            return self
        await self._run(lambda cursor: cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> StatementCursor:
        await self._run(lambda cursor: cursor.executemany(sql, parameters))
        return self

    async def _run(self, statement: Callable[[sqlite3.Cursor], object]) -> None:
        await self.close()
        connection = self._connection

        def work() -> tuple[sqlite3.Cursor | None, list[Any], Any, int, int | None]:
            cursor = connection.driver.cursor()
            statement(cursor)
            rows = cursor.fetchmany(FIRST_ROWS) if cursor.description else []
            more = len(rows) == FIRST_ROWS
            result = cursor.description, cursor.rowcount, cursor.lastrowid
            if not more:
                cursor.close()
            return (cursor if more else None), rows, *result

        ran = await connection.run(work, begin=connection.take_begin())
        self._cursor, rows, self.description, self.rowcount, self.lastrowid = ran
        self._rows = deque(rows)

    async def _fetch(self, size: int | None) -> None:
        """Bring the buffer up to ``size`` rows (None: all), if the statement has them."""
        cursor = self._cursor
        if cursor is None or (size is not None and len(self._rows) >= size):
            return
        wanted = None if size is None else max(size - len(self._rows), FIRST_ROWS)

        def work() -> tuple[list[Any], bool]:
            rows = cursor.fetchall() if wanted is None else cursor.fetchmany(wanted)
            done = wanted is None or len(rows) < wanted
            if done:
                cursor.close()
            return rows, done

        rows, done = await self._connection.run(work)
        self._rows.extend(rows)
        if done:
            self._cursor = None

    async def fetchone(self) -> Any:
        await self._fetch(1)
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        size = self.arraysize if size is None else size
        await self._fetch(size)
        return [self._rows.popleft() for _ in range(min(size, len(self._rows)))]

    async def fetchall(self) -> Sequence[Any]:
        await self._fetch(None)
        rows = list(self._rows)
        self._rows.clear()
        return rows

    async def close(self) -> None:
        self._rows.clear()
        cursor, self._cursor = self._cursor, None
        if cursor is not None:
            await self._connection.run(cursor.close)

    def __aiter__(self) -> StatementCursor:
        return self

    async def __anext__(self) -> Any:
        row = await self.fetchone()
        if row is None:
            raise StopAsyncIteration
        return row


class Connection(aiosqlite.Connection):
    """aiosqlite's connection with :class:`StatementCursor` cursors."""

    def __init__(self, connector: Callable[[], sqlite3.Connection]) -> None:
        super().__init__(connector, iter_chunk_size=FIRST_ROWS)
        self._thread.daemon = True  # as SQLAlchemy makes aiosqlite's: exiting never waits on it
        #: Whether SQLite has a transaction open, as of this connection's last
        #: statement; None: not known (something else ran since).
        self._in_transaction: bool | None = None
        #: A BEGIN not run yet: it goes with the next statement.
        self._begin: str | None = None
        #: Run statements on the event loop's thread, not in hops (:meth:`run`).
        self.brief = False

    @property
    def driver(self) -> sqlite3.Connection:
        """The sqlite3 connection, for :meth:`run`'s work (never used from two threads at once)."""
        return self._conn

    def defer_begin(self, sql: str) -> None:
        """Run BEGIN statement ``sql`` with the next statement, in its hop."""
        if self._begin is not None or self._in_transaction:
            raise sqlite3.OperationalError("cannot start a transaction within a transaction")
        self._begin = sql

    def take_begin(self) -> str | None:
        """The deferred BEGIN, for the statement about to run; it is then no longer pending."""
        begin, self._begin = self._begin, None
        return begin

    async def run(self, fn: Callable[[], Any], *, begin: str | None = None) -> Any:
        """Run statement work ``fn`` (after a deferred BEGIN ``begin``) and return its result.

        In one hop to the connection's thread; while :attr:`brief`, on the
        calling thread instead: brief transactions (claims, appends, a
        request's window) are a few indexed statements, which cost SQLite
        microseconds, less than the hop. Only a lock can make them wait, and
        only at a BEGIN that takes the write lock: that BEGIN is tried without
        waiting, and if the lock is held elsewhere the statement goes to the
        thread, which waits for it there.
        """
        if self.brief:
            try:
                return self._noted(fn, begin, False)
            except _LockHeld:
                pass
        return await self._execute(self._noted, fn, begin, True)

    def _noted(self, fn: Callable[[], Any], begin: str | None, wait: bool) -> Any:
        """``begin`` (if any), then ``fn``; whether a transaction is open is noted after.

        Without ``wait``, a BEGIN that would wait for the write lock raises
        :class:`_LockHeld` instead.
        """
        connection = self._conn
        try:
            if begin is not None:
                if not wait and _TAKES_WRITE_LOCK.search(begin):
                    _begin_without_waiting(connection, begin)
                else:
                    connection.execute(begin)
            return fn()
        finally:
            self._in_transaction = connection.in_transaction

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._in_transaction = None
        return await super()._execute(fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    def cursor(self) -> StatementCursor:  # type: ignore[override]
        return StatementCursor(self)

    async def commit(self) -> None:
        # A transaction whose BEGIN is still pending has done nothing: no hop.
        if self.take_begin() is None and self._in_transaction is not False:
            await super().commit()
            self._in_transaction = False

    async def rollback(self) -> None:
        if self.take_begin() is None and self._in_transaction is not False:
            await super().rollback()
            self._in_transaction = False


class _LockHeld(Exception):
    """A BEGIN tried without waiting found the write lock held elsewhere."""


def _begin_without_waiting(connection: sqlite3.Connection, begin: str) -> None:
    """Run ``begin`` with SQLite's busy handler off; :class:`_LockHeld` if it would wait."""
    ((waits_ms,),) = connection.execute("PRAGMA busy_timeout").fetchall()
    connection.execute("PRAGMA busy_timeout = 0")
    try:
        connection.execute(begin)
    except sqlite3.OperationalError as exc:
        if connection.in_transaction or not sqlite_busy(exc):
            raise
        raise _LockHeld from exc
    finally:
        connection.execute(f"PRAGMA busy_timeout = {int(waits_ms)}")


def opener(
    connect_args: Callable[[], tuple[Sequence[Any], dict[str, Any]]],
) -> Callable[[], Awaitable[Connection]]:
    """An ``async_creator`` for ``create_async_engine``.

    ``connect_args`` gives ``sqlite3.connect``'s arguments when a connection
    is opened (the engine's dialect computes them from the URL).
    """

    async def open_connection() -> Connection:
        args, kwargs = connect_args()
        # Used from the event loop's thread too (brief transactions), never at once.
        kwargs = {**kwargs, "check_same_thread": False}
        connection = Connection(lambda: sqlite3.connect(*args, **kwargs))
        await connection  # opens it on its thread
        return connection

    return open_connection
