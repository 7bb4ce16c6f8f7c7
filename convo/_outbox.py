"""The outbox: billed replies that could not be written to the database, kept on disk.

When the database fails between the API's reply and its write (the server
went away, the disk is full, a lock timed out), the reply is appended to a
local outbox file before the error reaches the caller: one JSON line per
reply, flushed and ``fsync``'d. The next use of the store (and ``convo outbox
replay``) writes the pending replies into their conversations and removes
them from the file. A reply is never written twice: before writing, the store
looks for a turn with the same request id (or idempotency key) in the
conversation.

One file per database: ``<user data dir>/outbox/<sha256 of the URL>.jsonl``
(the URL with its password masked is stored in each line, never the password).
Writers in several processes take an exclusive ``flock`` on the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs

__all__ = ["Outbox", "PendingReply", "outbox_path"]


def outbox_path(url_key: str) -> Path:
    """The outbox file of the database whose (unmasked) URL is ``url_key``."""
    digest = hashlib.sha256(url_key.encode("utf-8")).hexdigest()[:32]
    return platformdirs.user_data_path("convo", appauthor=False) / "outbox" / f"{digest}.jsonl"


@dataclass(frozen=True, slots=True)
class PendingReply:
    """One reply waiting in the outbox."""

    id: str
    store: str
    conversation_id: str
    user_seq: int
    owner: str
    turn: dict[str, Any]
    created_at: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "store": self.store,
            "conversation_id": self.conversation_id,
            "user_seq": self.user_seq,
            "owner": self.owner,
            "turn": self.turn,
            "created_at": self.created_at,
        }


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the outbox (a ``.lock`` file beside it), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: one process at a time is assumed
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class Outbox:
    """The pending replies of one database, in a JSON-lines file."""

    def __init__(self, path: Path, store_label: str) -> None:
        self.path = path
        self.store_label = store_label

    def add(self, conversation_id: str, user_seq: int, owner: str, turn: dict[str, Any]) -> str:
        """Append one reply durably (flushed and fsync'd) and return its id."""
        entry = PendingReply(
            id=secrets.token_hex(8),
            store=self.store_label,
            conversation_id=conversation_id,
            user_seq=user_seq,
            owner=owner,
            turn=turn,
            created_at=datetime.now(UTC).isoformat(),
        )
        line = json.dumps(entry.as_json(), ensure_ascii=False) + "\n"
        with _locked(self.path):
            new = not self.path.exists()
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            if new:
                _fsync_dir(self.path.parent)
        return entry.id

    def has_pending(self) -> bool:
        """Cheap: is there anything in the outbox (one ``stat``)."""
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def pending(self) -> list[PendingReply]:
        """Every reply waiting, oldest first (a torn last line is skipped)."""
        if not self.has_pending():
            return []
        entries = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    raw = json.loads(line)
                    entries.append(PendingReply(**raw))
                except (ValueError, TypeError):
                    continue  # a line torn by a crash mid-write: its reply was never acknowledged
        return entries

    @contextlib.contextmanager
    def draining(self) -> Iterator[tuple[list[PendingReply], set[str]]]:
        """Hold the outbox lock; yield the pending replies and a set to add written ids to.

        On leaving, the written ids are removed from the file (rewritten
        atomically), also when an error ends the block part-way.
        """
        with _locked(self.path):
            entries = self.pending()
            done: set[str] = set()
            try:
                yield entries, done
            finally:
                if done:
                    self._rewrite([e for e in entries if e.id not in done])

    def _rewrite(self, keep: list[PendingReply]) -> None:
        if not keep:
            self.path.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)
            return
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for entry in keep:
                handle.write(json.dumps(entry.as_json(), ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        _fsync_dir(self.path.parent)
