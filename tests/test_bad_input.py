"""Bad arguments get one clear error naming them, before anything is written.

Each case here used to end in a traceback from deep inside (RecursionError,
OverflowError, a driver error) or in a silently wrong result (a negative
budget, a throwaway in-memory database).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from convo import (
    ConversationStore,
    DatabaseUnavailable,
    InvalidInput,
    InvalidMessage,
    MessageTooLarge,
)


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(depth):
        value = {"deeper": value}
    return value


def _count_turns(store: ConversationStore, conversation_id: str) -> int:
    return len(store.get(conversation_id).history())


def test_deep_nesting_in_metadata_and_tool_input(store: ConversationStore) -> None:
    with pytest.raises(InvalidInput, match="metadata: is nested more than 32 levels"):
        store.create(metadata=_nested(5_000))
    conv = store.create(metadata=_nested(25))
    with pytest.raises(InvalidInput, match="metadata: is nested"):
        conv.update(metadata=_nested(5_000))
    with pytest.raises(InvalidInput, match="metadata: is nested"):
        conv.update(metadata=_nested(40))  # past MariaDB's JSON limit, so refused everywhere
    deep_call = [{"type": "tool_use", "id": "t1", "name": "f", "input": _nested(5_000)}]
    with pytest.raises(InvalidMessage, match="content: is nested more than 32 levels"):
        conv.add("assistant", deep_call)
    assert _count_turns(store, conv.id) == 0
    assert store.get(conv.id).metadata == _nested(25)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s: s.list(limit=2**64), "limit"),
        (lambda s: s.search("x", limit=2**64), "limit"),
        (lambda s: s.create(token_budget=2**40), "token_budget"),
        (lambda s: s.create().update(token_budget=2**40), "token_budget"),
        (lambda s: s.prune(older_than=timedelta(days=999_999)), "older_than"),
        (lambda s: s.usage(since=datetime(2026, 1, 1)), "since"),
        (lambda s: list(s.iter_conversations(since=datetime(2026, 1, 1))), "since"),
    ],
)
def test_unchecked_numbers_and_times(store: ConversationStore, call: object, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        call(store)  # type: ignore[operator]
    assert caught.value.field == field


@pytest.mark.parametrize("lease", [math.nan, math.inf, -1.0, 0, "60", 10**12])
def test_send_lease_must_be_a_sane_number(tmp_path: Path, lease: object) -> None:
    with pytest.raises(InvalidInput, match="send_lease"):
        ConversationStore(f"sqlite:///{tmp_path / 'c.db'}", send_lease=lease)  # type: ignore[arg-type]


@pytest.mark.parametrize(("max_tokens", "match"), [("100", "positive integer"), (10**9, "no room")])
def test_max_tokens_is_checked_before_anything_is_sent(
    store: ConversationStore, max_tokens: object, match: str
) -> None:
    conv = store.create()
    conv.add("user", "hello")
    with pytest.raises(InvalidInput, match=match) as caught:
        conv.window(max_tokens=max_tokens)
    assert caught.value.field == "max_tokens"


def test_a_turn_larger_than_mysql_takes_is_refused_up_front(store: ConversationStore) -> None:
    """MariaDB drops the connection over a statement past max_allowed_packet (16 MiB)."""
    limit = store.database.max_statement_bytes()
    if limit is None:
        pytest.skip(f"{store.database.dialect} has no per-statement size limit")
    conv = store.create()
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "A" * (limit + 1)},
    }
    with pytest.raises(MessageTooLarge, match="max_allowed_packet"):
        conv.add("user", [image])
    conv.add("user", "the connection is still fine")
    assert [m.text for m in conv.history()] == ["the connection is still fine"]


@pytest.mark.parametrize(
    ("url", "error", "match"),
    [
        ("sqlite://", InvalidInput, "sqlite:///:memory:"),
        ("/var/lib/app/convo.db", InvalidInput, "sqlite:////var/lib/app/convo.db"),
        ("postgresql://app:s3cret@db:port/app", InvalidInput, "cannot be parsed"),
    ],
)
def test_urls_that_cannot_work(url: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        ConversationStore(url)
    assert "s3cret" not in str(caught.value)


def test_a_sqlite_url_naming_a_folder(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="names a folder"):
        ConversationStore(f"sqlite:///{tmp_path}")


def test_a_sqlite_file_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    with pytest.raises(DatabaseUnavailable, match="cannot create its folder"):
        ConversationStore(f"sqlite:///{blocker / 'convo.db'}")


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A real read-only file system (a loop-mounted ext4 image), or skip saying why."""
    if not shutil.which("mkfs.ext4") or not shutil.which("mount"):
        pytest.skip("mkfs.ext4 and mount are needed to make a read-only file system")
    image, mountpoint = tmp_path / "fs.img", tmp_path / "mnt"
    mountpoint.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)]).returncode:
        pytest.skip("cannot loop-mount a file system here (needs root and loop devices)")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=False)


def test_a_read_only_file_system_is_not_called_a_bad_database(read_only_mount: Path) -> None:
    url = f"sqlite:///{read_only_mount / 'convo.db'}"
    with ConversationStore(url) as store:
        store.create().add("user", "written before the disk went read-only")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)], check=True)
    with pytest.raises(DatabaseUnavailable, match="not writable"):
        ConversationStore(url).list()


def test_a_mysql_url_at_a_silent_port_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another service's port (Redis, say) accepts the connection and never greets."""
    import socket
    import time

    from convo import _database

    monkeypatch.setattr(_database, "MYSQL_GREETING_TIMEOUT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="sent no MySQL greeting"):
            ConversationStore(f"mysql://root@127.0.0.1:{port}/test").list()
        assert time.monotonic() - started < 30  # not PyMySQL's endless wait
