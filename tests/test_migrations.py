"""Migrations: one head, down to base and up again with data, no drift from the models."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, text

from convo import ConversationStore, ExtractiveSummarizer, SchemaOutOfDate, _migrations
from convo._database import Database, resolve_url
from convo._models import ConversationRow, MessageRow


def test_exactly_one_head() -> None:
    assert len(_migrations.script_directory().get_heads()) == 1


def test_every_revision_has_a_downgrade() -> None:
    for script in _migrations.script_directory().walk_revisions():
        assert callable(getattr(script.module, "downgrade", None)), script.revision


def _fill(url: str) -> str:
    with ConversationStore(url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.create(title="survivor", metadata={"k": "v"})
        conv.add("user", "hello 🌍")
        conv.add("assistant", [{"type": "text", "text": "hi"}])
        conv.add("user", "bye")
        assert conv.compact() is not None  # turns 1-2 now live in an archive block
        return conv.id


def _contents(database: Database) -> list[object]:
    with database.transaction() as session:
        return list(
            session.execute(text("SELECT content FROM convo_messages ORDER BY seq")).scalars()
        )


def _counts(database: Database) -> tuple[int, int]:
    with database.transaction() as session:
        conversations = session.scalar(select(func.count()).select_from(ConversationRow))
        messages = session.scalar(select(func.count()).select_from(MessageRow))
    return conversations or 0, messages or 0


def _stem_index(database: Database) -> bool:
    """Whether migration 0005's stemmed full-text index is there (none on MySQL)."""
    with database.transaction() as session:
        dialect = session.get_bind().dialect.name
        if dialect == "sqlite":
            sql = "SELECT count(*) FROM sqlite_master WHERE name LIKE 'convo_search_fts_stem%'"
        elif dialect == "postgresql":
            sql = (
                "SELECT count(*) FROM information_schema.columns "
                "WHERE column_name = 'convo_search_fts_english'"
            )
        else:
            return False
        return bool(session.scalar(text(sql)))


def test_upgrade_downgrade_every_step_and_upgrade_again_with_data(database_url: str) -> None:
    database = Database(resolve_url(database_url))
    try:
        revisions = [s.revision for s in _migrations.script_directory().walk_revisions()]
        revisions.reverse()  # oldest first
        _migrations.upgrade(database)
        kept = _fill(database_url)
        # Step down one revision at a time while the data can stay, checking it did.
        stemmed = _stem_index(database)
        assert stemmed == (database.dialect != "mysql")
        for index in range(len(revisions) - 1, 0, -1):
            _migrations.downgrade(database, revisions[index - 1])
            assert _counts(database) == (1, 3)
            if revisions[index] == "0005":
                assert not _stem_index(database)
        # Archived content went back into the rows before the archive table went.
        contents = [c if isinstance(c, list) else json.loads(str(c)) for c in _contents(database)]
        assert contents == [
            [{"type": "text", "text": "hello 🌍"}],
            [{"type": "text", "text": "hi"}],
            [{"type": "text", "text": "bye"}],
        ]
        _migrations.downgrade(database, "base")
        with database.transaction() as session:
            names = session.connection().dialect.get_table_names(session.connection())
        # No convo table is left, Alembic's version table included.
        assert [name for name in names if name.startswith("convo_")] == []
        _migrations.upgrade(database)
        assert _counts(database) == (0, 0)
        _fill(database_url)
        # Up one step at a time from base too, with rows present in between.
        _migrations.downgrade(database, revisions[0])
        for revision in revisions[1:]:
            _migrations.upgrade(database, revision)
            assert _counts(database) == (1, 3)
        with ConversationStore(database_url) as store:
            assert kept not in {c.id for c in store.list()}
            (conv,) = store.list()
            assert [m.text for m in conv.history()] == ["hello 🌍", "hi", "bye"]
            # Upgrading through 0004 indexed the archived turns for search too.
            assert [(h.seq, h.role) for h in store.search("hello")] == [(1, "user")]
            # Through 0005, the stemmed recall index too: "hellos" finds "hello".
            assert [(h.seq, h.role) for h in store.recall("hellos")] == [(1, "user")]
            assert _stem_index(database) == stemmed
            assert conv.metadata == {"k": "v"}
    finally:
        database.close()


def test_models_and_migrations_do_not_drift(migrated_url: str) -> None:
    database = Database(resolve_url(migrated_url))
    try:
        _migrations.check(database)
    finally:
        database.close()


def test_check_reports_drift(migrated_url: str) -> None:
    database = Database(resolve_url(migrated_url))
    try:
        with database.migration_connection() as connection:
            connection.execute(text("CREATE INDEX ix_drift ON convo_messages (role)"))
        with pytest.raises(SchemaOutOfDate, match="differs from convo's models"):
            _migrations.check(database)
    finally:
        database.close()


def test_check_reports_pending_migrations(database_url: str) -> None:
    database = Database(resolve_url(database_url))
    try:
        with pytest.raises(SchemaOutOfDate, match="convo db upgrade"):
            _migrations.check(database)
    finally:
        database.close()


def test_alembic_from_the_repository_root(tmp_path: object, database_url: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for args in (["upgrade", "head"], ["check"], ["current"]):
        done = subprocess.run(
            [sys.executable, "-m", "alembic", "-x", f"db={database_url}", *args],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    assert _migrations.head_revision() in done.stdout
