"""idempotency keys: a retried add/send cannot store a turn twice

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("convo_messages") as batch_op:
        batch_op.add_column(sa.Column("key", sa.String(length=128), nullable=True))
        batch_op.create_unique_constraint(
            "uq_convo_messages_conversation_id_key", ["conversation_id", "key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("convo_messages") as batch_op:
        batch_op.drop_constraint("uq_convo_messages_conversation_id_key", type_="unique")
        batch_op.drop_column("key")
