"""`convo verify` finds every kind of damage, and damaged rows give one-line errors elsewhere.

Each case damages a compacted conversation the way it happens outside convo
(a hand-written UPDATE, a bad restore, a half-applied script) on every
backend, and checks that verify names it, that an undamaged conversation
beside it still verifies, and that reading the damaged one raises a convo
error rather than a traceback from the driver.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from convo import (
    Conversation,
    ConversationStore,
    ConvoError,
    CorruptedData,
    ExtractiveSummarizer,
)
from convo._cli import cli
from convo._export import export_history
from convo._models import ArchiveBlockRow, ConversationRow, MessageRow, SummaryRow
from convo._verify import content_problem

Damage = Callable[[Session, Conversation], None]


@pytest.fixture
def compacted(migrated_url: str) -> Iterator[tuple[ConversationStore, Conversation, Conversation]]:
    """A store with two compacted conversations: one to damage, one to stay sound."""
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        convs = []
        for _ in range(2):
            conv = store.create()
            for i in range(8):
                conv.add("user" if i % 2 == 0 else "assistant", f"turn {i} about trams")
            conv.compact()
            conv.add("user", "and the newest question")
            convs.append(conv)
        assert store.verify() == []
        yield store, convs[0], convs[1]


def _archived_assistant_seq(session: Session, conv: Conversation) -> int:
    return session.scalars(
        select(func.min(MessageRow.seq)).where(
            MessageRow.conversation_id == conv.id,
            MessageRow.content.is_(None),
            MessageRow.role == "assistant",
        )
    ).one()


def _newest_seq(session: Session, conv: Conversation) -> int:
    return session.scalars(
        select(func.max(MessageRow.seq)).where(MessageRow.conversation_id == conv.id)
    ).one()


def _missing_summary(session: Session, conv: Conversation) -> None:
    session.execute(delete(SummaryRow).where(SummaryRow.conversation_id == conv.id))


def _archived_through_past_archive(session: Session, conv: Conversation) -> None:
    session.execute(
        update(ConversationRow)
        .where(ConversationRow.id == conv.id)
        .values(archived_through_seq=ConversationRow.archived_through_seq + 1)
    )


def _role_changed_on_archived_turn(session: Session, conv: Conversation) -> None:
    seq = _archived_assistant_seq(session, conv)
    session.execute(
        update(MessageRow)
        .where(MessageRow.conversation_id == conv.id, MessageRow.seq == seq)
        .values(role="user")
    )


def _content_not_blocks(session: Session, conv: Conversation) -> None:
    # Valid JSON on every backend (PostgreSQL's json type refuses invalid JSON).
    session.execute(
        text("UPDATE convo_messages SET content = :c WHERE conversation_id = :id AND seq = :seq"),
        {"c": '{"text": "no list"}', "id": conv.id, "seq": _newest_seq(session, conv)},
    )


def _system_role(session: Session, conv: Conversation) -> None:
    session.execute(
        update(MessageRow)
        .where(MessageRow.conversation_id == conv.id, MessageRow.seq == _newest_seq(session, conv))
        .values(role="system")
    )


def _last_seq_behind(session: Session, conv: Conversation) -> None:
    session.execute(
        update(ConversationRow)
        .where(ConversationRow.id == conv.id)
        .values(last_seq=ConversationRow.last_seq - 1)
    )


def _block_checksum(session: Session, conv: Conversation) -> None:
    session.execute(
        update(ArchiveBlockRow)
        .where(ArchiveBlockRow.conversation_id == conv.id)
        .values(checksum="0" * 64)
    )


DAMAGE: dict[str, tuple[Damage, str]] = {
    "missing summary": (_missing_summary, "summary row is missing"),
    "archived_through past archive": (_archived_through_past_archive, "is past the archive"),
    "role changed on an archived turn": (
        _role_changed_on_archived_turn,
        "role that differs from their archive block",
    ),
    "live content not blocks": (_content_not_blocks, "not a list of content blocks"),
    "system role": (_system_role, "role other than user or assistant"),
    "last_seq behind": (_last_seq_behind, "turn counter (last_seq"),
    "block checksum": (_block_checksum, "checksum mismatch"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verify_names_each_kind_of_damage(
    compacted: tuple[ConversationStore, Conversation, Conversation], kind: str
) -> None:
    store, damaged, sound = compacted
    damage, expected = DAMAGE[kind]
    with store.database.transaction(write=True) as session:
        damage(session, damaged)
    faults = store.verify()
    assert faults, kind
    assert all(fault.startswith(damaged.id) or damaged.id in fault for fault in faults)
    assert any(expected in fault for fault in faults), faults
    assert not any(sound.id in fault for fault in faults)

    result = CliRunner().invoke(cli, ["verify", "--db", store.url])
    assert result.exit_code == 1
    assert expected in result.stderr


@pytest.mark.parametrize("kind", ["role changed on an archived turn", "block checksum"])
def test_damaged_archive_reads_as_one_error(
    compacted: tuple[ConversationStore, Conversation, Conversation], kind: str
) -> None:
    store, damaged, _ = compacted
    with store.database.transaction(write=True) as session:
        DAMAGE[kind][0](session, damaged)
    with pytest.raises(CorruptedData):
        damaged.history()
    with pytest.raises(CorruptedData):
        export_history(store, io.StringIO(), conversation_ids=[damaged.id])
    result = CliRunner().invoke(cli, ["show", damaged.id, "--db", store.url])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_system_role_fails_the_window_not_the_api(
    compacted: tuple[ConversationStore, Conversation, Conversation],
) -> None:
    store, damaged, sound = compacted
    with store.database.transaction(write=True) as session:
        _system_role(session, damaged)
    with pytest.raises(CorruptedData, match="role 'system'"):
        damaged.window()
    assert sound.window().params["messages"]


def test_invalid_json_in_a_live_turn(migrated_url: str) -> None:
    """Only SQLite can hold text that is not JSON in the content column."""
    if not migrated_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's json and MariaDB's JSON check refuse invalid JSON on write")
    with ConversationStore(migrated_url) as store:
        damaged, sound = store.create(), store.create()
        for conv in (damaged, sound):
            conv.add("user", "hello")
        with store.database.transaction(write=True) as session:
            session.execute(
                text("UPDATE convo_messages SET content = :c WHERE conversation_id = :id"),
                {"c": '[{"type": "te', "id": damaged.id},
            )
        faults = store.verify()
        assert len(faults) == 1
        assert "is not valid JSON" in faults[0]
        assert damaged.id in faults[0]
        for read in (damaged.window, damaged.history):
            with pytest.raises(CorruptedData, match="convo verify"):
                read()
        assert sound.window().params["messages"]
        result = CliRunner().invoke(cli, ["show", damaged.id, "--db", store.url])
        assert result.exit_code == 1
        assert "cannot be decoded" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_text_that_is_not_utf8_is_corruption_not_an_outage(migrated_url: str) -> None:
    if not migrated_url.startswith("sqlite"):
        pytest.skip("only SQLite stores bytes that are not UTF-8 in a text column")
    with ConversationStore(migrated_url) as store:
        conv = store.create(title="fine")
        conv.add("user", "hello")
        with store.database.transaction(write=True) as session:
            session.execute(
                text("UPDATE convo_conversations SET title = CAST(X'FFFE' AS TEXT) WHERE id = :id"),
                {"id": conv.id},
            )
        with pytest.raises(ConvoError) as caught:
            store.get(conv.id)
        assert isinstance(caught.value, CorruptedData)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ('[{"type": "text", "text": "ok"}]', None),
        ("[{", "is not valid JSON"),
        ('"text"', "is a JSON str"),
        ("[]", "has no content blocks"),
        ('[{"text": "no type"}]', "block 0 is not a content block"),
        ("[1]", "block 0 is not a content block"),
    ],
)
def test_content_problem(raw: str, problem: str | None) -> None:
    found = content_problem(raw)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found
