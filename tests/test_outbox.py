"""The database failing between the API's reply and its write: the billed reply survives.

SQLite loses its writes through an engine event that fails the INSERT of the
assistant turn the way a full disk would; the servers really go away while
the reply is on its way: PostgreSQL's backends for the database are
terminated and new connections refused; on MariaDB the store connects as a
user of its own, whose account is locked and whose connections are killed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from convo import APIError, ReplyNotStored
from convo._cli import cli
from convo._database import resolve_url
from tests.conftest import summarizing_reply
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI, Reply
from tests.test_send_faults import failing_statements

pytestmark = pytest.mark.faces


def _is_assistant_insert(sql: str, parameters: Any) -> bool:
    values = parameters.values() if isinstance(parameters, dict) else parameters or ()
    return sql.lstrip().upper().startswith("INSERT INTO CONVO_MESSAGES") and "assistant" in list(
        values
    )


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


class Outage:
    """Takes the database away and brings it back."""

    def __init__(self, url: str, store: ConversationStore) -> None:
        self.url = url
        self.store = store
        self.down = False
        self._event: Any = None

    def kill(self) -> None:
        if self.down:
            return
        self.down = True
        if self.url.startswith("sqlite"):
            self._event = failing_statements(
                self.store, lambda sql, _p: sql.lstrip().upper().startswith(("INSERT", "UPDATE"))
            )
            self._event.__enter__()
            return
        if self.url.startswith("mysql"):
            with _mysql_admin() as admin:
                for host in _MYSQL_HOSTS:
                    admin.execute(text(f"ALTER USER '{_MYSQL_USER}'@'{host}' ACCOUNT LOCK"))
                threads = admin.execute(
                    text("SELECT id FROM information_schema.processlist WHERE user = :user"),
                    {"user": _MYSQL_USER},
                ).scalars()
                for thread in list(threads):
                    with contextlib.suppress(sa_exc.OperationalError):  # gone already
                        admin.execute(text(f"KILL CONNECTION {int(thread)}"))
            return
        url = resolve_url(self.url)
        engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        name = str(url.database)
        try:
            with engine.connect() as connection:
                connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": name},
                )
        finally:
            engine.dispose()

    def revive(self) -> None:
        if not self.down:
            return
        self.down = False
        if self._event is not None:
            self._event.__exit__(None, None, None)
            self._event = None
            return
        if self.url.startswith("mysql"):
            with _mysql_admin() as admin:
                for host in _MYSQL_HOSTS:
                    admin.execute(text(f"ALTER USER '{_MYSQL_USER}'@'{host}' ACCOUNT UNLOCK"))
            return
        url = resolve_url(self.url)
        engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(
                    text('ALTER DATABASE "' + str(url.database) + '" ALLOW_CONNECTIONS true')
                )
        finally:
            engine.dispose()


#: MariaDB: the user the store connects as, so that the outage can lock it out.
_MYSQL_USER = "convo_outage"
_MYSQL_HOSTS = ("%", "localhost")


@contextmanager
def _mysql_admin() -> Iterator[Any]:
    from tests.conftest import SERVER_URLS

    engine = create_engine(resolve_url(SERVER_URLS["mysql"]), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def _mysql_outage_url(admin_url: str) -> str:
    """``admin_url``'s database, reached as a user of its own (created here)."""
    database = str(resolve_url(admin_url).database)
    with _mysql_admin() as admin:
        for host in _MYSQL_HOSTS:
            account = f"'{_MYSQL_USER}'@'{host}'"
            admin.execute(text(f"CREATE USER IF NOT EXISTS {account}"))
            admin.execute(text(f"ALTER USER {account} ACCOUNT UNLOCK"))
            admin.execute(text(f"GRANT ALL PRIVILEGES ON `{database}`.* TO {account}"))
    url = resolve_url(admin_url).set(username=_MYSQL_USER, password=None)
    return url.render_as_string(hide_password=False)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ],
)
def outage_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    from tests.conftest import server_url

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'convo.db'}"
    elif request.param == "mysql":
        url = _mysql_outage_url(server_url("mysql"))
    else:
        url = server_url("postgres")
    with ConversationStore(url) if url.startswith("sqlite") else _upgraded(url):
        pass
    return url


@contextmanager
def _upgraded(url: str) -> Iterator[None]:
    from convo import _migrations
    from convo._database import Database

    database = Database(resolve_url(url))
    try:
        _migrations.upgrade(database)
    finally:
        database.close()
    yield


def test_the_database_dying_between_reply_and_write_keeps_the_reply(
    outage_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    store = ConversationStore(outage_url, client=api_client)
    outage = Outage(outage_url, store)
    try:
        conv = store.create()

        def reply(body: dict[str, Any]) -> Reply:
            outage.kill()  # while the reply is on its way
            return summarizing_reply(body)

        fake_api.reply = reply
        with pytest.raises(ReplyNotStored) as caught:
            conv.send("the precious question")
        error = caught.value
        (request,) = [r for r in fake_api.requests if r.path == "/v1/messages"]
        assert error.reply.text == "echo: the precious question"
        assert error.reply.request_id == request.request_id
        assert error.reply.usage == request.response["usage"]  # type: ignore[index]
        assert "outbox" in str(error)
        (pending,) = store.pending_replies()
        assert pending.id == error.outbox_id
        assert store.records.outbox.path.is_file()
        assert "test-key" not in store.records.outbox.path.read_text()
        fake_api.reply = summarizing_reply
        outage.revive()
        # `convo verify` reports it (and does not write it).
        code, _, err = _cli("verify", "--db", outage_url)
        assert code == 1
        assert "pending in the outbox" in err
        assert conv.id in err
        # The next use of the store writes it, and releases the dead send's claim:
        # the next send is not kept waiting for the lease.
        reply_to_next = conv.send("next question")
        history = conv.history()
        assert [(m.role, m.text) for m in history] == [
            ("user", "the precious question"),
            ("assistant", "echo: the precious question"),
            ("user", "next question"),
            ("assistant", reply_to_next.text),
        ]
        assert history[1].request_id == request.request_id
        assert store.pending_replies() == []
        assert store.replay_outbox() == 0
        assert _cli("verify", "--db", outage_url)[0] == 0
    finally:
        outage.revive()
        store.close()


def test_an_api_error_during_a_database_outage_stays_an_api_error(
    outage_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    client = api_client.with_options(max_retries=0)
    store = ConversationStore(outage_url, client=client)
    outage = Outage(outage_url, store)
    try:
        conv = store.create()

        def reply(body: dict[str, Any]) -> Reply:
            outage.kill()
            raise RuntimeError("the API fails too")

        fake_api.reply = reply
        with pytest.raises(APIError) as caught:
            conv.send("hello?")
        assert caught.value.status_code == 500
        assert store.pending_replies() == []
    finally:
        outage.revive()
        store.close()


def test_a_reply_whose_write_committed_unacknowledged_is_not_replayed_twice(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        armed = {"assistant": False}

        def before(_c: Any, _cur: Any, sql: str, parameters: Any, *_: Any) -> None:
            if _is_assistant_insert(sql, parameters):
                armed["assistant"] = True

        def after_commit(_session: Session) -> None:
            if armed["assistant"]:
                armed["assistant"] = False
                raise sa_exc.OperationalError("COMMIT", None, Exception("connection lost"))

        event.listen(store.database.engine, "before_cursor_execute", before)
        event.listen(Session, "after_commit", after_commit)
        try:
            with pytest.raises(ReplyNotStored):
                conv.send("did it commit?")
        finally:
            event.remove(Session, "after_commit", after_commit)
            event.remove(store.database.engine, "before_cursor_execute", before)
        assert len(store.pending_replies()) == 1
        assert store.replay_outbox() == 0  # already there: not written again
        assert store.pending_replies() == []
        assert [m.role for m in conv.history()] == ["user", "assistant"]
        assert store.records.release(conv.id) is False


def test_convo_outbox_replay_and_list(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        with (
            failing_statements(store, _is_assistant_insert),
            pytest.raises(ReplyNotStored) as caught,
        ):
            conv.send("spool me")
        assert caught.value.reply.text == "echo: spool me"
        assert store.records.release(conv.id) is False  # the database was up for the release
    code, out, err = _cli("outbox", "list", "--db", migrated_url)
    assert code == 0
    assert conv.id in out
    assert "1 pending" in err
    code, out, _ = _cli("outbox", "replay", "--db", migrated_url)
    assert (code, out.strip()) == (0, "wrote 1 pending replies; 0 left")
    with ConversationStore(migrated_url) as store:
        assert [m.text for m in store.get(conv.id).history()] == ["spool me", "echo: spool me"]
