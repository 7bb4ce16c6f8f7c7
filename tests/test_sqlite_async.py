"""The async store's SQLite connection: one thread hop per statement, nothing else changed.

Every async test on SQLite runs over this connection; these check what it
does differently from plain aiosqlite: statements with many rows, streamed
results, errors inside a transaction, and the hops themselves.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncEngine

from convo import _bridge, _sqlite_async
from convo._database import Database, make_engine
from convo._sqlite_async import FIRST_ROWS, Connection

T = TypeVar("T")

ROWS = 2 * FIRST_ROWS + 5  # more than one hop's worth, and not a multiple of it


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


async def _engine(path: Path) -> AsyncEngine:
    engine = AsyncEngine(make_engine(make_url(f"sqlite:///{path}"), asynchronous=True))
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY, word TEXT)"))
        await connection.execute(
            text("INSERT INTO t (n, word) VALUES (:n, :word)"),
            [{"n": n, "word": f"w{n}"} for n in range(ROWS)],
        )
    return engine


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every function the connections run on their threads."""
    seen: list[str] = []
    original = Connection._execute

    async def counted(self: Connection, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        seen.append(getattr(fn, "__name__", repr(fn)))
        return await original(self, fn, *args, **kw)

    monkeypatch.setattr(Connection, "_execute", counted)
    return seen


def test_a_result_larger_than_one_hop_comes_whole_and_in_order(tmp_path: Path) -> None:
    async def main() -> list[int]:
        engine = await _engine(tmp_path / "c.db")
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text("SELECT n FROM t ORDER BY n"))
                return [n for (n,) in result]
        finally:
            await engine.dispose()

    assert run(main) == list(range(ROWS))


def test_a_streamed_result_comes_in_batches_whole_and_in_order(tmp_path: Path) -> None:
    async def main() -> tuple[list[int], int | None]:
        engine = await _engine(tmp_path / "c.db")
        try:
            async with engine.connect() as connection:
                result = await connection.stream(
                    text("SELECT n FROM t ORDER BY n").execution_options(yield_per=100)
                )
                got = [n async for (n,) in result]
                one = await connection.scalar(text("SELECT n FROM t WHERE n = 7"))
                return got, one
        finally:
            await engine.dispose()

    got, one = run(main)
    assert got == list(range(ROWS))
    assert one == 7  # the connection is fine after a partly fetched statement


def test_a_failed_statement_rolls_its_transaction_back(tmp_path: Path) -> None:
    async def main() -> tuple[BaseException, int, int]:
        engine = await _engine(tmp_path / "c.db")
        try:

            async def delete_then_duplicate() -> None:
                async with engine.begin() as connection:
                    await connection.execute(text("DELETE FROM t WHERE n < 10"))
                    await connection.execute(text("INSERT INTO t (n, word) VALUES (20, 'dup')"))

            with pytest.raises(sa_exc.IntegrityError) as raised:
                await delete_then_duplicate()
            async with engine.connect() as connection:
                kept = await connection.scalar(text("SELECT count(*) FROM t"))
                dup = await connection.scalar(text("SELECT count(*) FROM t WHERE word = 'dup'"))
            return raised.value, int(kept or 0), int(dup or 0)
        finally:
            await engine.dispose()

    error, kept, dup = run(main)
    assert isinstance(error.orig, sqlite3.IntegrityError)  # type: ignore[attr-defined]
    assert (kept, dup) == (ROWS, 0)


def test_a_statement_is_one_hop_and_a_pool_reset_none(tmp_path: Path, hops: list[str]) -> None:
    """Plain aiosqlite makes four hops per statement (open a cursor, execute, fetch,
    close) and one more when the pool resets a connection that has committed."""

    async def main() -> None:
        engine = await _engine(tmp_path / "c.db")
        try:
            async with engine.connect() as connection:
                await connection.scalar(text("SELECT 1"))  # connect; the dialect's first checks
                await connection.commit()
            hops.clear()
            async with engine.connect() as connection:
                assert await connection.scalar(text("SELECT word FROM t WHERE n = 3")) == "w3"
                await connection.commit()
            assert len(hops) == 2  # BEGIN with the select, the commit; no reset after it
            hops.clear()
            async with engine.begin() as connection:
                await connection.execute(text("UPDATE t SET word = 'x' WHERE n = 3"))
                await connection.execute(text("UPDATE t SET word = 'y' WHERE n = 4"))
            assert len(hops) == 3  # BEGIN with the first update, the second, the commit
            hops.clear()
            async with engine.begin():
                pass
            assert hops == []  # a transaction that ran nothing costs nothing
        finally:
            await engine.dispose()

    run(main)


def test_a_connection_left_in_a_transaction_is_rolled_back(tmp_path: Path) -> None:
    """The pool's reset is skipped only when no transaction is open."""

    async def main() -> int:
        engine = await _engine(tmp_path / "c.db")
        try:
            async with engine.connect() as connection:
                await connection.execute(text("UPDATE t SET word = 'x' WHERE n = 3"))
                # closed without a commit: the pool must roll the update back
            async with engine.connect() as connection:
                return int(
                    await connection.scalar(text("SELECT count(*) FROM t WHERE word = 'x'")) or 0
                )
        finally:
            await engine.dispose()

    assert run(main) == 0


def test_a_begin_that_cannot_take_the_lock_fails_its_first_statement(tmp_path: Path) -> None:
    """A deferred BEGIN IMMEDIATE meets a lock held elsewhere in its statement's hop:
    that statement raises SQLite's own error, and the connection is left with no
    transaction, ready for the next."""
    path = tmp_path / "locked.db"
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE t (n INTEGER)")

    def connect() -> Connection:
        return Connection(lambda: sqlite3.connect(path, timeout=0.05, isolation_level=None))

    async def main() -> tuple[str, list[tuple[int]]]:
        holder, waiter = await connect(), await connect()
        try:
            held = holder.cursor()
            await held.execute("BEGIN IMMEDIATE")
            await held.execute("INSERT INTO t VALUES (1)")
            cursor = waiter.cursor()
            await cursor.execute("BEGIN IMMEDIATE")  # deferred: no error yet
            with pytest.raises(sqlite3.OperationalError) as locked:
                await cursor.execute("INSERT INTO t VALUES (2)")
            await waiter.rollback()
            await holder.commit()
            await cursor.execute("BEGIN IMMEDIATE")
            await cursor.execute("INSERT INTO t VALUES (3)")
            await waiter.commit()
            await cursor.execute("SELECT n FROM t ORDER BY n")
            return str(locked.value), list(await cursor.fetchall())
        finally:
            await holder.close()
            await waiter.close()

    error, rows = run(main)
    assert "locked" in error
    assert rows == [(1,), (3,)]


def test_a_brief_transaction_hops_only_to_commit(tmp_path: Path, hops: list[str]) -> None:
    """A send's claim and reply run their statements on the loop's thread: a few
    indexed statements cost SQLite less than one trip through the threads."""
    database = Database(make_url(f"sqlite:///{tmp_path}/b.db"), asynchronous=True)

    def work() -> tuple[list[str], list[str], int]:
        with database.transaction(write=True) as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))
        hops.clear()
        with database.transaction(write=True, brief=True) as session:
            session.execute(text("INSERT INTO t VALUES (1)"))
            session.execute(text("INSERT INTO t VALUES (2)"))
            count = session.execute(text("SELECT count(*) FROM t")).scalar_one()
        brief = list(hops)
        hops.clear()
        with database.transaction(write=True) as session:
            session.execute(text("INSERT INTO t VALUES (3)"))
        return brief, list(hops), count

    async def main() -> tuple[list[str], list[str], int]:
        try:
            return await _bridge.run(work)
        finally:
            await _bridge.run(database.close)

    brief, plain, count = run(main)
    assert count == 2
    assert brief == ["commit"]
    assert plain == ["_noted", "commit"]  # BEGIN with the insert, then the commit


def test_a_brief_transaction_waits_for_the_lock_off_the_loop(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock: a brief write transaction waits for
    it on the connection's thread, and the loop keeps running meanwhile."""
    path = tmp_path / "b.db"
    database = Database(make_url(f"sqlite:///{path}"), asynchronous=True)

    def create() -> None:
        with database.transaction(write=True) as session:
            session.execute(text("CREATE TABLE t (n INTEGER)"))

    def write() -> int:
        with database.transaction(write=True, brief=True) as session:
            session.execute(text("INSERT INTO t VALUES (1)"))
            return int(session.execute(text("SELECT count(*) FROM t")).scalar_one())

    async def main() -> tuple[int, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        await _bridge.run(create)
        holder = sqlite3.connect(path, isolation_level=None)  # "another process"
        ticker = asyncio.ensure_future(tick())
        try:
            holder.execute("BEGIN IMMEDIATE")
            holder.execute("INSERT INTO t VALUES (0)")
            writing = asyncio.ensure_future(_bridge.run(write))
            await asyncio.sleep(0.3)
            assert not writing.done()  # waiting for the lock
            ticked_while_waiting = ticks
            holder.execute("COMMIT")
            return await asyncio.wait_for(writing, 10), ticked_while_waiting
        finally:
            ticker.cancel()
            holder.close()
            await _bridge.run(database.close)

    count, ticks = run(main)
    assert count == 2
    assert ticks >= 20  # 300 ms of 5 ms ticks: the loop was never held by the wait


def test_the_engine_opens_statement_connections() -> None:
    async def main() -> type:
        opened = _sqlite_async.opener(lambda: ((":memory:",), {}))
        connection = await opened()
        try:
            return type(connection)
        finally:
            await connection.close()

    assert run(main) is Connection
