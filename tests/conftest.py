"""Shared fixtures: isolated paths and environment, and the three databases.

Server databases come from ``CONVO_TEST_POSTGRES_URL`` and
``CONVO_TEST_MYSQL_URL`` (defaults: the local servers on 127.0.0.1). A server
that cannot be reached makes its tests skip with the reason, unless
``CONVO_TEST_REQUIRE_SERVERS=1`` (set by ``.ci/run``), which makes them fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
from sqlalchemy import create_engine, text

from convo import ConversationStore
from convo._database import resolve_url
from convo._models import Base
from convo._schema import VERSION_TABLE
from convo._summarizer import SUMMARIZER_SYSTEM
from tests import faces
from tests.fakeapi import FakeMessagesAPI, Reply

SERVER_URLS = {
    "postgres": os.environ.get(
        "CONVO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("CONVO_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
}
REQUIRE_SERVERS = os.environ.get("CONVO_TEST_REQUIRE_SERVERS") == "1"
_reachable: dict[str, str | None] = {}


def _server_problem(kind: str) -> str | None:
    """None if the server answers, else why not."""
    if kind not in _reachable:
        engine = create_engine(resolve_url(SERVER_URLS[kind]))
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            _reachable[kind] = None
        except Exception as exc:
            _reachable[kind] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        finally:
            engine.dispose()
    return _reachable[kind]


def reset_server_database(url: str) -> None:
    """Drop convo's tables (and only those) from a server database."""
    engine = create_engine(resolve_url(url))
    try:
        with engine.begin() as connection:
            Base.metadata.drop_all(connection)
            connection.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    finally:
        engine.dispose()


def server_url(kind: str) -> str:
    """The URL of a reset server database, or skip (fail in CI) if it is absent."""
    problem = _server_problem(kind)
    if problem is not None:
        message = f"{kind} server not reachable at {SERVER_URLS[kind]} ({problem})"
        if REQUIRE_SERVERS:
            pytest.fail(message + "; CONVO_TEST_REQUIRE_SERVERS=1 needs it")
        pytest.skip(message + "; set CONVO_TEST_" + kind.upper() + "_URL to use another")
    reset_server_database(SERVER_URLS[kind])
    return SERVER_URLS[kind]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test marked `faces` runs once per API: sync and async (see tests/faces.py).
    if metafunc.definition.get_closest_marker("faces") is not None:
        if "face" not in metafunc.fixturenames:
            metafunc.fixturenames.append("face")  # set up by _face_first, below
        metafunc.parametrize("face", ["sync", "async"], indirect=True)


@pytest.fixture
def face(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which API the test drives: ``sync`` or ``async`` (``tests.faces.ConversationStore``)."""
    faces.FACE = request.param
    yield request.param
    faces.FACE = "sync"


@pytest.fixture(autouse=True)
def _face_first(request: pytest.FixtureRequest) -> None:
    """A `faces` test's API is chosen before any other fixture opens a store."""
    if request.node.get_closest_marker("faces") is not None:
        request.getfixturevalue("face")


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test touches the user's files, database or API key."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    for name in ("CONVO_DATABASE_URL", "CONVO_MODEL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database, once per kind: SQLite file, PostgreSQL, MariaDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'convo.db'}"
    return server_url(request.param)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """A URL of a database at convo's newest schema."""
    from convo import _migrations
    from convo._database import Database

    database = Database(resolve_url(database_url))
    try:
        _migrations.upgrade(database)
    finally:
        database.close()
    return database_url


@pytest.fixture
def store(migrated_url: str) -> Iterator[ConversationStore]:
    """A store on a migrated database: the sync one, or the async one for a `faces` test."""
    with faces.ConversationStore(migrated_url) as opened:
        yield opened


def summarizing_reply(body: dict[str, object]) -> Reply:
    """The fake's replies: a short summary for summarizer requests, else an echo."""
    messages = body["messages"]
    assert isinstance(messages, list)
    last = messages[-1]["content"]
    last_text = (
        last
        if isinstance(last, str)
        else " ".join(b.get("text", "") for b in last if isinstance(b, dict))
    )
    if body.get("system") == SUMMARIZER_SYSTEM:
        turns = last_text.count("(turn ")
        return Reply(text=f"Summary of {turns} more turns: they discussed things.")
    return Reply(text="echo: " + last_text[-200:].strip())


@pytest.fixture
def fake_api() -> Iterator[FakeMessagesAPI]:
    """A fake Messages API on 127.0.0.1 whose tokenizer is cl100k x 1.2."""
    with FakeMessagesAPI(reply=summarizing_reply) as fake:
        yield fake


@pytest.fixture
def api_client(fake_api: FakeMessagesAPI) -> Iterator[anthropic.Anthropic]:
    """The real SDK client, pointed at the fake."""
    with anthropic.Anthropic(
        base_url=fake_api.base_url, api_key="test-key", max_retries=2
    ) as client:
        yield client
