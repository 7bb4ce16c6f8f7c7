"""archive blocks, summaries and calibration

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Downgrading puts every archived turn's content back into its message row
before the archive table goes: no turn is lost either way.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

from convo._models import UTCDateTime

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_Document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
_TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def _conversation_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["conversation_id"],
        ["convo_conversations.id"],
        name=op.f(f"fk_{table}_conversation_id_convo_conversations"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "convo_calibration",
        sa.Column("model", sa.String(length=100), nullable=False),
        sa.Column("factor", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_convo_calibration")),
        **_TABLE_OPTIONS,
    )
    op.create_table(
        "convo_archive_blocks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("first_seq", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("payload", _LongText, nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column("raw_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _conversation_fk("convo_archive_blocks"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_convo_archive_blocks")),
        sa.UniqueConstraint(
            "conversation_id",
            "first_seq",
            name=op.f("uq_convo_archive_blocks_conversation_id_first_seq"),
        ),
        **_TABLE_OPTIONS,
    )
    op.create_table(
        "convo_summaries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("through_seq", sa.Integer(), nullable=False),
        sa.Column("text", _LongText, nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("summarizer", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("usage", _Document, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        _conversation_fk("convo_summaries"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_convo_summaries")),
        sa.UniqueConstraint(
            "conversation_id",
            "through_seq",
            name=op.f("uq_convo_summaries_conversation_id_through_seq"),
        ),
        **_TABLE_OPTIONS,
    )
    with op.batch_alter_table("convo_conversations") as batch_op:
        batch_op.add_column(
            sa.Column("archived_through_seq", sa.Integer(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("convo_messages") as batch_op:
        batch_op.alter_column("content", existing_type=sa.JSON(none_as_null=True), nullable=True)


def _restore_archived_content() -> None:
    """Write the content of every archived turn back into its message row."""
    connection = op.get_bind()
    blocks = sa.table(
        "convo_archive_blocks",
        sa.column("id", sa.Integer()),
        sa.column("conversation_id", sa.String()),
        sa.column("payload", sa.Text()),
    )
    messages = sa.table(
        "convo_messages",
        sa.column("conversation_id", sa.String()),
        sa.column("seq", sa.Integer()),
        sa.column("content", sa.JSON(none_as_null=True)),
    )
    rows = connection.execute(
        sa.select(blocks.c.conversation_id, blocks.c.payload).order_by(blocks.c.id)
    )
    for conversation_id, payload in rows.fetchall():
        turns = json.loads(zlib.decompress(base64.b64decode(payload)))
        for turn in turns:
            connection.execute(
                messages.update()
                .where(
                    messages.c.conversation_id == conversation_id,
                    messages.c.seq == turn["seq"],
                )
                .values(content=turn["content"])
            )


def downgrade() -> None:
    _restore_archived_content()
    with op.batch_alter_table("convo_messages") as batch_op:
        batch_op.alter_column("content", existing_type=sa.JSON(none_as_null=True), nullable=False)
    with op.batch_alter_table("convo_conversations") as batch_op:
        batch_op.drop_column("archived_through_seq")
    op.drop_table("convo_summaries")
    op.drop_table("convo_archive_blocks")
    op.drop_table("convo_calibration")
