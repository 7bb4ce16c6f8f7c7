"""full-text search over every turn

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

The searchable text of each turn goes in convo_search (kept when the turn
is archived), indexed by the database's own full-text search: an FTS5 table
kept in step by triggers on SQLite, a GIN tsvector index on PostgreSQL, a
FULLTEXT index on MySQL/MariaDB. Existing turns, archived ones included, are
indexed on upgrade.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from convo._search import searchable_text

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Case-insensitive on MySQL/MariaDB: FULLTEXT matching follows the collation.
_SearchText = sa.Text().with_variant(
    mysql.LONGTEXT(collation="utf8mb4_unicode_ci"), "mysql", "mariadb"
)
_TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}

_SQLITE_FTS = [
    "CREATE VIRTUAL TABLE convo_search_fts USING fts5("
    "text, content='convo_search', content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER convo_search_fts_insert AFTER INSERT ON convo_search BEGIN "
    "INSERT INTO convo_search_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER convo_search_fts_delete AFTER DELETE ON convo_search BEGIN "
    "INSERT INTO convo_search_fts(convo_search_fts, rowid, text) "
    "VALUES ('delete', old.id, old.text); END",
]


def _backfill() -> None:
    connection = op.get_bind()
    search = sa.table(
        "convo_search",
        sa.column("conversation_id", sa.String()),
        sa.column("seq", sa.Integer()),
        sa.column("text", sa.Text()),
    )
    rows = []
    for conversation_id, seq, content in connection.execute(
        sa.text(
            "SELECT conversation_id, seq, content FROM convo_messages WHERE content IS NOT NULL"
        )
    ):
        blocks = json.loads(content) if isinstance(content, str) else content
        rows.append((conversation_id, seq, blocks))
    for conversation_id, payload in connection.execute(
        sa.text("SELECT conversation_id, payload FROM convo_archive_blocks")
    ):
        for turn in json.loads(zlib.decompress(base64.b64decode(payload))):
            rows.append((conversation_id, turn["seq"], turn["content"]))
    values = [
        {"conversation_id": c, "seq": s, "text": t}
        for c, s, blocks in rows
        if (t := searchable_text(blocks))
    ]
    if values:
        connection.execute(search.insert(), values)


def upgrade() -> None:
    op.create_table(
        "convo_search",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("text", _SearchText, nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["convo_conversations.id"],
            name=op.f("fk_convo_search_conversation_id_convo_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_convo_search")),
        sa.UniqueConstraint(
            "conversation_id", "seq", name=op.f("uq_convo_search_conversation_id_seq")
        ),
        **_TABLE_OPTIONS,
    )
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for statement in _SQLITE_FTS:
            op.execute(statement)
    elif dialect == "postgresql":
        op.execute(
            "CREATE INDEX convo_search_fts_index ON convo_search "
            "USING gin (to_tsvector('simple', text))"
        )
    else:
        op.execute("CREATE FULLTEXT INDEX convo_search_fts_index ON convo_search (text)")
    _backfill()


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS convo_search_fts_insert")
        op.execute("DROP TRIGGER IF EXISTS convo_search_fts_delete")
        op.execute("DROP TABLE IF EXISTS convo_search_fts")
    op.drop_table("convo_search")
