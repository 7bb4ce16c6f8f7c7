"""Connecting to the database: URLs, engines, and the context manager owning each transaction.

* ``None`` means ``CONVO_DATABASE_URL``, then the embedded SQLite file in the
  user data directory.
* ``postgresql://`` and ``postgres://`` use psycopg 3; ``mysql://`` and
  ``mariadb://`` use PyMySQL (the ``postgres`` and ``mysql`` extras).
* The async store (:class:`~convo.AsyncConversationStore`) uses the same URLs
  with the async drivers: aiosqlite, psycopg 3's async side and aiomysql
  (the ``async``, ``postgres`` and ``mysql`` extras), through SQLAlchemy's
  asyncio extension.
* SQLite runs in WAL mode with a busy timeout, foreign keys on, and write
  transactions that take the write lock up front (``BEGIN IMMEDIATE``), so
  concurrent writers queue instead of failing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from sqlalchemy import URL, Connection, Engine, create_engine, event, make_url, pool
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ._embedded import ENV_DATABASE_URL, default_database_path, inspect_sqlite_file
from .errors import (
    CorruptedData,
    DatabaseUnavailable,
    InvalidInput,
    MissingDriver,
)

#: The password part of a URL that could not be parsed (so it is never echoed).
_PASSWORD: Final = re.compile(r"(://[^:/@]*:)[^@]*@")
SQLITE_BUSY_TIMEOUT_S: Final = 60.0
#: How long a MySQL/MariaDB server may take to greet a new connection.
MYSQL_GREETING_TIMEOUT_S: Final = 10.0

_DRIVERS: Final = {
    "postgresql": ("postgresql+psycopg", "psycopg", "postgres"),
    "postgres": ("postgresql+psycopg", "psycopg", "postgres"),
    "mysql": ("mysql+pymysql", "pymysql", "mysql"),
    "mariadb": ("mariadb+pymysql", "pymysql", "mysql"),
}

#: The async driver of each backend: (drivername, module to import, extras to install).
_ASYNC_DRIVERS: Final = {
    "sqlite": ("sqlite+aiosqlite", "aiosqlite", "async"),
    "postgresql": ("postgresql+psycopg_async", "psycopg", "async,postgres"),
    "mysql": ("mysql+aiomysql", "aiomysql", "async,mysql"),
    "mariadb": ("mariadb+aiomysql", "aiomysql", "async,mysql"),
}


def resolve_url(url: str | URL | None = None) -> URL:
    """The URL convo will use: given, else ``CONVO_DATABASE_URL``, else the embedded file."""
    if url is None:
        url = os.environ.get(ENV_DATABASE_URL) or f"sqlite:///{default_database_path()}"
    if isinstance(url, str) and "://" not in url:
        hint = f"; for a SQLite file write sqlite:///{url}" if url.strip() else ""
        raise InvalidInput("database URL", f"{url!r} is not a URL{hint}")
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except (sa_exc.ArgumentError, ValueError) as exc:
        shown = _PASSWORD.sub(r"\1***@", url) if isinstance(url, str) else url
        raise InvalidInput("database URL", f"cannot be parsed: {shown!r} ({exc})") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite" and not parsed.database:
        raise InvalidInput(
            "database URL",
            "sqlite:// names no file; write sqlite:///path/to/convo.db, or sqlite:///:memory: "
            "for a throwaway in-memory database",
        )
    if "+" not in parsed.drivername and backend in _DRIVERS:
        parsed = parsed.set(drivername=_DRIVERS[backend][0])
    if parsed.get_backend_name() in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    if backend == "sqlite" and parsed.database and parsed.database != ":memory:":
        parsed = parsed.set(database=str(Path(parsed.database).expanduser()))
    return parsed


def mask(url: URL) -> str:
    """The URL as it is safe to print: its password replaced by ``***``."""
    return url.render_as_string(hide_password=True)


def command_url(url: URL) -> str:
    """The URL to show in a command to copy: no password at all (``***`` would be copied)."""
    bare = URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    )
    return bare.render_as_string(hide_password=False)


def sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory database."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return None
    return Path(database)


def sqlite_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another connection holds a lock it needs."""
    return "locked" in str(exc) or "busy" in str(exc)


def _use_wal(cursor: Any) -> None:
    """Switch the file to WAL, waiting out other processes opening it at the same time.

    Changing the journal mode needs an exclusive lock, and SQLite answers "database
    is locked" at once, without its busy handler, when another connection is in the
    middle of the same switch or of recovery. So we wait here, up to the busy timeout.
    WAL is persistent: once one process has switched, the rest find it already on.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not sqlite_busy(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below), so pysqlite must not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if wal:
            _use_wal(cursor)
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A write transaction takes the write lock at BEGIN: a deferred one that
        # read first could not upgrade its lock once another writer committed.
        write = connection.get_execution_options().get("convo_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _prepare_sqlite_path(url: URL, path: Path) -> None:
    """Make the SQLite file's folder, or say plainly why the file cannot be used."""
    if path.is_dir():
        raise InvalidInput("database URL", f"{mask(url)} names a folder, not a database file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailable(
            f"cannot use the database at {mask(url)}: cannot create its folder {path.parent} "
            f"({exc.strerror or exc})"
        ) from None
    if not path.parent.is_dir():
        raise InvalidInput("database URL", f"{mask(url)}: {path.parent} is not a folder")


def async_url(url: URL) -> URL:
    """``url`` with its backend's async driver (a URL naming one already is kept)."""
    backend = url.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise InvalidInput("database URL", f"convo has no async driver for {mask(url)}")
    drivername, module, extras = _ASYNC_DRIVERS[backend]
    for needed in ("greenlet", module):
        try:
            __import__(needed)
        except ModuleNotFoundError:
            raise MissingDriver(
                f"the async store needs the {needed} package for {mask(url)}, which is not "
                f"installed: pip install 'convo-store[{extras}]'"
            ) from None
    if url.get_driver_name() in ("aiosqlite", "psycopg_async", "aiomysql", "asyncmy", "asyncpg"):
        return url
    return url.set(drivername=drivername)


def _create(url: URL, asynchronous: bool, **options: Any) -> Engine:
    """``create_engine``, or for the async store the sync face of ``create_async_engine``.

    The async engine's ``sync_engine`` is a real :class:`Engine` whose driver
    awaits: the same statements and sessions run over it inside
    ``greenlet_spawn`` (see ``convo._bridge``).
    """
    if not asynchronous:
        return create_engine(url, **options)
    from sqlalchemy.ext.asyncio import create_async_engine

    if url.get_backend_name() != "sqlite":
        return create_async_engine(url, **options).sync_engine
    # SQLite: aiosqlite connections that make one thread hop per statement.
    from ._sqlite_async import opener

    extra = options.pop("connect_args", {})

    def connect_args() -> tuple[Any, dict[str, Any]]:
        args, kwargs = engine.dialect.create_connect_args(url)
        return args, {**kwargs, **extra}

    engine = create_async_engine(url, async_creator=opener(connect_args), **options).sync_engine
    return engine


def make_engine(
    url: URL, *, echo: bool = False, asynchronous: bool = False, pool_size: int | None = None
) -> Engine:
    """An engine for ``url`` with convo's connection settings.

    ``pool_size`` connections are kept open (SQLAlchemy's default: 5), and up
    to twice as many more are opened under load.
    """
    backend = url.get_backend_name()
    pooling = {} if pool_size is None else {"pool_size": pool_size, "max_overflow": 2 * pool_size}
    if asynchronous:
        url = async_url(url)
    if backend == "sqlite":
        path = sqlite_file(url)
        if path is None:
            engine = _create(
                url,
                asynchronous,
                echo=echo,
                poolclass=pool.StaticPool,
                connect_args={"check_same_thread": False},
            )
        else:
            engine = _create(
                url,
                asynchronous,
                echo=echo,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
                **pooling,
            )
        _configure_sqlite(engine, wal=path is not None)
        return engine
    try:
        engine = _create(url, asynchronous, echo=echo, pool_pre_ping=True, **pooling)
    except ModuleNotFoundError as exc:
        extra = next((v[2] for k, v in _DRIVERS.items() if k == backend), None)
        hint = (
            f"pip install 'convo-store[{extra}]'" if extra else f"install the driver for {backend}"
        )
        raise MissingDriver(
            f"{mask(url)} needs the {exc.name} package, which is not installed: {hint}"
        ) from None
    except sa_exc.NoSuchModuleError:
        raise InvalidInput("database URL", f"unknown database or driver in {mask(url)}") from None
    if url.get_driver_name() == "pymysql":
        _expect_mysql_greeting(engine)
    return engine


def _expect_mysql_greeting(engine: Engine) -> None:
    """Connect PyMySQL over a socket that has already shown a MySQL server's greeting.

    A MySQL server speaks first. PyMySQL waits for that greeting with no time
    limit, so a URL pointing at another service's port (Redis, HTTP, ...)
    would hang. Here the socket waits at most :data:`MYSQL_GREETING_TIMEOUT_S`
    for the first byte (peeked, not consumed), then PyMySQL takes it over with
    its own public ``defer_connect`` / ``connect(sock)``.
    """

    @event.listens_for(engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        if cparams.get("unix_socket") or "host" not in cparams:
            return None  # a local socket file: nothing else can be listening there
        host, port = cparams["host"], int(cparams.get("port") or 3306)
        timeout = float(cparams.get("connect_timeout") or MYSQL_GREETING_TIMEOUT_S)
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.settimeout(min(timeout, MYSQL_GREETING_TIMEOUT_S))
            try:
                first = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                first = b""
            if not first:
                raise dialect.loaded_dbapi.OperationalError(
                    2013,
                    f"{host}:{port} accepted the connection but sent no MySQL greeting within "
                    f"{MYSQL_GREETING_TIMEOUT_S:g} s; is it the port of another service?",
                )
            connection = dialect.loaded_dbapi.connect(*cargs, **cparams, defer_connect=True)
            connection.connect(sock)
            return connection
        except BaseException:
            sock.close()
            raise


def unavailable(url: URL, exc: BaseException) -> DatabaseUnavailable:
    """A :class:`DatabaseUnavailable` for ``exc``, with no password in its text."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if url.password:
        detail = detail.replace(str(url.password), "***")
    return DatabaseUnavailable(f"cannot use the database at {mask(url)}: {detail}")


#: SQLite's words for a stored text that is not UTF-8 (the row was written outside convo).
_UNDECODABLE: Final = "Could not decode to UTF-8"


def corrupted(exc: BaseException) -> CorruptedData:
    """A :class:`CorruptedData` for a stored value that cannot be decoded."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return CorruptedData(
        f"a stored value cannot be decoded ({detail}); it was damaged outside convo. "
        "`convo verify` names the conversation and the turn"
    )


def _pragma(connection: Connection, pragma: str) -> None:
    """Run a SQLite PRAGMA on the driver's connection, outside any transaction."""
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


class Database:
    """An engine and the transactions over it. One per store; safe across threads."""

    def __init__(
        self,
        url: URL,
        *,
        echo: bool = False,
        allow_other_tables: bool = False,
        asynchronous: bool = False,
        pool_size: int | None = None,
    ) -> None:
        """Open ``url``. A SQLite file is checked read-only first (see
        :func:`inspect_sqlite_file`), so one that is not convo's stays untouched.

        ``asynchronous``: the engine's driver is async (aiosqlite, psycopg
        async, aiomysql); every use of it must then run inside
        ``greenlet_spawn``, which is how the async store runs this same code.
        """
        self.url = url
        self.asynchronous = asynchronous
        path = sqlite_file(url)
        if path is not None:
            _prepare_sqlite_path(url, path)
            inspect_sqlite_file(path, allow_other_tables=allow_other_tables)
        self.engine = make_engine(url, echo=echo, asynchronous=asynchronous, pool_size=pool_size)
        self._thread_writer = threading.Lock()
        self._task_writer = asyncio.Lock()
        self._write_engine = self.engine.execution_options(convo_write=True)
        self._max_packet: int | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def max_statement_bytes(self) -> int | None:
        """MySQL/MariaDB's ``max_allowed_packet`` (read once), else None: no such limit.

        A larger statement makes the server drop the connection, which the
        driver reports as a lost connection, not as the input's fault.
        """
        if self.dialect not in ("mysql", "mariadb"):
            return None
        if self._max_packet is None:
            with self._reported(), self.engine.connect() as connection:
                self._max_packet = int(
                    connection.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one()
                )
        return self._max_packet

    @contextmanager
    def _reported(self) -> Iterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            if _UNDECODABLE in str(exc):
                raise corrupted(exc) from exc
            raise unavailable(self.url, exc) from exc
        except json.JSONDecodeError as exc:
            # Only reading a stored JSON column decodes JSON inside a transaction.
            raise corrupted(exc) from exc

    @contextmanager
    def transaction(self, *, write: bool = False, brief: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error.

        ``write=True`` marks a transaction that will write; on SQLite it takes
        the write lock when it begins. ``brief=True`` marks a few indexed
        statements (a send's claim, its reply): the async store runs those on
        SQLite without thread hops (see ``convo._sqlite_async``).
        """
        engine = self._write_engine if write else self.engine
        with (
            self._writer(write),
            self._reported(),
            Session(engine, expire_on_commit=False) as session,
            session.begin(),
            self._briefly(session, brief),
        ):
            yield session

    @contextmanager
    def _briefly(self, session: Session, brief: bool) -> Iterator[None]:
        """While the transaction's statements run: on the async store's SQLite
        connection, without thread hops (its commit, after this, still hops)."""
        if not (brief and self.asynchronous and self.dialect == "sqlite"):
            yield
            return
        from ._sqlite_async import Connection as AsyncSQLite

        driver = session.connection().connection.driver_connection
        if not isinstance(driver, AsyncSQLite):  # pragma: no cover - convo's engine opens these
            yield
            return
        driver.brief = True
        try:
            yield
        finally:
            driver.brief = False

    @contextmanager
    def _writer(self, write: bool) -> Iterator[None]:
        """On SQLite, one write transaction of this process at a time.

        SQLite has one writer anyway. Queueing the store's own writers here
        (a lock for threads, an asyncio lock for tasks) spares them SQLite's
        busy handler, which polls with sleeps of up to 100 ms: under many
        concurrent sends that, not the work, was most of a send's time. Other
        processes still wait on SQLite's lock, within the busy timeout.
        """
        if not write or self.dialect != "sqlite":
            yield
            return
        if not self.asynchronous:
            with self._thread_writer:
                yield
            return
        from ._bridge import wait

        lock = self._task_writer
        wait(lock.acquire())
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def migration_connection(self) -> Iterator[Connection]:
        """A connection in one write transaction, for schema changes.

        On SQLite, foreign keys are off meanwhile: a batch migration recreates
        a table, and dropping the old copy must not cascade to other tables.
        """
        with self._reported(), self._write_engine.connect() as connection:
            sqlite = self.dialect == "sqlite"
            if sqlite:
                _pragma(connection, "foreign_keys = OFF")
            try:
                with connection.begin():
                    yield connection
            finally:
                if sqlite:
                    _pragma(connection, "foreign_keys = ON")

    def close(self) -> None:
        self.engine.dispose()
