"""conversations and messages

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from convo._models import UTCDateTime

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_Document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_TABLE_OPTIONS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "convo_conversations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=True),
        sa.Column("title", sa.String(length=500), nullable=True),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("system", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("token_budget", sa.Integer(), nullable=True),
        sa.Column("metadata", _Document, nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_convo_conversations")),
        **_TABLE_OPTIONS,
    )
    op.create_index("ix_convo_conversations_user_id_id", "convo_conversations", ["user_id", "id"])
    op.create_table(
        "convo_messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("content", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("token_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("stop_reason", sa.String(length=64), nullable=True),
        sa.Column("usage", _Document, nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["convo_conversations.id"],
            name=op.f("fk_convo_messages_conversation_id_convo_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_convo_messages")),
        sa.UniqueConstraint(
            "conversation_id", "seq", name=op.f("uq_convo_messages_conversation_id_seq")
        ),
        **_TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("convo_messages")
    op.drop_index("ix_convo_conversations_user_id_id", table_name="convo_conversations")
    op.drop_table("convo_conversations")
