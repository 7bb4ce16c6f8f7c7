"""stemmed full-text index for ranked recall

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23

Ranked recall (``store.recall``) matches word stems ("trams" finds "tram")
and ranks by the database's own relevance, so it needs an index of its own
beside 0004's exact one (which ``store.search`` keeps using): an FTS5 table
with the ``porter`` tokenizer on SQLite (kept in step by triggers, filled
from every stored turn on upgrade); on PostgreSQL a stored generated column
``to_tsvector('english', text)`` (computed for every stored turn on upgrade)
with a GIN index. MySQL/MariaDB rank with
natural-language mode over 0004's FULLTEXT index (no stemmer there), which
already covers every stored turn: nothing changes on those.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_UP = [
    "CREATE VIRTUAL TABLE convo_search_fts_stem USING fts5("
    "text, content='convo_search', content_rowid='id', "
    "tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER convo_search_fts_stem_insert AFTER INSERT ON convo_search BEGIN "
    "INSERT INTO convo_search_fts_stem(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER convo_search_fts_stem_delete AFTER DELETE ON convo_search BEGIN "
    "INSERT INTO convo_search_fts_stem(convo_search_fts_stem, rowid, text) "
    "VALUES ('delete', old.id, old.text); END",
    # Index every turn already stored (archived ones included).
    "INSERT INTO convo_search_fts_stem(convo_search_fts_stem) VALUES ('rebuild')",
]
_SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS convo_search_fts_stem_insert",
    "DROP TRIGGER IF EXISTS convo_search_fts_stem_delete",
    "DROP TABLE IF EXISTS convo_search_fts_stem",
]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in _SQLITE_UP:
            op.execute(statement)
    elif dialect == "postgresql":
        # Stored, so ranking reads each match's tsvector instead of parsing its text again.
        op.execute(
            "ALTER TABLE convo_search ADD COLUMN convo_search_fts_english tsvector "
            "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED"
        )
        op.execute(
            "CREATE INDEX convo_search_fts_english_index ON convo_search "
            "USING gin (convo_search_fts_english)"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in _SQLITE_DOWN:
            op.execute(statement)
    elif dialect == "postgresql":
        op.execute("DROP INDEX IF EXISTS convo_search_fts_english_index")
        op.execute("ALTER TABLE convo_search DROP COLUMN IF EXISTS convo_search_fts_english")
