"""Where the database is, how it is reached, and what happens when it cannot be used."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from convo import (
    ConversationStore,
    DatabaseUnavailable,
    InvalidInput,
    MissingDriver,
    NotAConvoDatabase,
    SchemaOutOfDate,
    _migrations,
)
from convo._database import Database, default_database_path, resolve_url
from convo._schema import VERSION_TABLE
from tests.conftest import server_url


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_is_embedded_sqlite_in_user_data_dir(isolated_environment: Path) -> None:
    path = default_database_path()
    assert path.is_relative_to(isolated_environment)
    assert not path.exists()
    with ConversationStore() as store:
        conv = store.create()
        conv.add("user", "hello")
    assert path.exists()
    with ConversationStore() as store:
        assert store.get(conv.id).history()[0].text == "hello"


def test_environment_variable_chooses_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "chosen.db"
    monkeypatch.setenv("CONVO_DATABASE_URL", f"sqlite:///{target}")
    with ConversationStore() as store:
        store.create()
        assert str(target) in store.url
    assert target.exists()
    assert not default_database_path().exists()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    with (
        ConversationStore(f"sqlite:///{tmp_path / 'w.db'}") as store,
        store.database.transaction() as session,
    ):
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert session.execute(text("PRAGMA busy_timeout")).scalar() >= 5_000


def test_in_memory_sqlite_works() -> None:
    with ConversationStore("sqlite:///:memory:") as store:
        conv = store.create()
        conv.add("user", "ephemeral")
        assert [m.text for m in store.get(conv.id).history()] == ["ephemeral"]


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg"),
        ("mysql://u@h/db", "mysql+pymysql"),
        ("mariadb://u@h/db", "mariadb+pymysql"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_url_drivers(given: str, driver: str) -> None:
    assert resolve_url(given).drivername == driver


def test_mysql_urls_get_utf8mb4() -> None:
    assert resolve_url("mysql://u@h/db").query["charset"] == "utf8mb4"


def test_unparseable_url() -> None:
    with pytest.raises(InvalidInput, match="database URL"):
        ConversationStore("not a url at all")


def test_unreachable_server_names_url_with_password_masked() -> None:
    url = "postgresql://alice:s3cret-pw@127.0.0.1:1/nowhere"
    with pytest.raises(DatabaseUnavailable) as caught:
        ConversationStore(url)
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert "alice:***@127.0.0.1:1/nowhere" in message
    assert "s3cret-pw" not in repr(caught.value.__cause__)


def test_missing_driver_is_named() -> None:
    with pytest.raises(MissingDriver, match="pyodbc"):
        ConversationStore("mssql+pyodbc://u:pw@h/db")


def test_a_file_that_is_not_sqlite_is_left_untouched(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    before = _digest(path)
    with pytest.raises(NotAConvoDatabase, match="not a SQLite database"):
        ConversationStore(f"sqlite:///{path}")
    assert _digest(path) == before
    assert [p.name for p in path.parent.iterdir()] == ["notes.db"]


def test_another_apps_sqlite_database_is_left_untouched(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "app.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users (name) VALUES ('ada')")
    con.commit()
    con.close()
    before = _digest(path)
    with pytest.raises(NotAConvoDatabase) as caught:
        ConversationStore(f"sqlite:///{path}")
    assert "users" in str(caught.value)
    assert "convo db upgrade" in str(caught.value)
    assert _digest(path) == before
    assert [p.name for p in path.parent.iterdir()] == ["app.db"]


def test_an_empty_sqlite_file_becomes_a_convo_database(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with ConversationStore(f"sqlite:///{path}") as store:
        store.create()


SERVERS = [
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("mysql", marks=pytest.mark.mysql),
]


@pytest.mark.parametrize("kind", SERVERS)
def test_server_database_behind_asks_for_convo_db_upgrade(kind: str) -> None:
    url = server_url(kind)
    with pytest.raises(SchemaOutOfDate) as caught:
        ConversationStore(url)
    assert "convo db upgrade" in str(caught.value)
    assert "no convo schema" in str(caught.value)
    # It did not create anything on its own.
    engine = create_engine(resolve_url(url))
    with engine.connect() as connection:
        names = set(connection.dialect.get_table_names(connection))
    engine.dispose()
    assert not any(name.startswith("convo_") for name in names)


@pytest.mark.parametrize("kind", SERVERS)
def test_server_database_at_an_unknown_revision_is_refused(kind: str) -> None:
    database_url = server_url(kind)
    database = Database(resolve_url(database_url))
    _migrations.upgrade(database)
    with database.migration_connection() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'"))
    database.close()
    with pytest.raises(SchemaOutOfDate, match="upgrade convo"):
        ConversationStore(database_url)


def test_embedded_database_from_a_newer_convo_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'future.db'}"
    ConversationStore(url).close()
    database = Database(resolve_url(url))
    with database.migration_connection() as connection:
        connection.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'"))
    database.close()
    with pytest.raises(SchemaOutOfDate, match="does not know"):
        ConversationStore(url)


def test_sqlite_store_upgrades_itself_from_an_older_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    database = Database(resolve_url(url))
    revisions = [s.revision for s in _migrations.script_directory().walk_revisions()]
    _migrations.upgrade(database, revisions[-1])  # the oldest
    database.close()
    with ConversationStore(url) as store:
        store.create().add("user", "works at head")
        with store.database.transaction() as session:
            revision = _migrations.schema_revision(session.connection())
    assert revision == _migrations.head_revision()


def test_switching_to_wal_waits_for_another_process_writing(tmp_path: Path) -> None:
    # A fresh file in rollback-journal mode while another connection holds the write
    # lock: SQLite refuses the switch to WAL at once, without its busy handler, so the
    # store must wait for the writer (seen in CI as "database is locked" when several
    # processes opened a new embedded database together).
    import threading

    from sqlalchemy import make_url

    from convo._database import make_engine

    path = tmp_path / "busy.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE other (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    finish = threading.Timer(0.3, writer.execute, args=("COMMIT",))
    finish.start()
    try:
        engine = make_engine(make_url(f"sqlite:///{path}"))
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
    finally:
        finish.join()
        writer.close()
