"""send claims: one send/stream in flight per conversation

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from convo._models import UTCDateTime

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("convo_conversations") as batch_op:
        batch_op.add_column(sa.Column("busy_until", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("busy_owner", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("convo_conversations") as batch_op:
        batch_op.drop_column("busy_owner")
        batch_op.drop_column("busy_until")
