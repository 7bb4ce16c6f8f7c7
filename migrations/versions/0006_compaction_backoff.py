"""compaction backoff and the sticky window start

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from convo._models import UTCDateTime

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("convo_conversations") as batch_op:
        batch_op.add_column(
            sa.Column("window_start_seq", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("compaction_failures", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("compaction_retry_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("convo_conversations") as batch_op:
        batch_op.drop_column("compaction_retry_at")
        batch_op.drop_column("compaction_failures")
        batch_op.drop_column("window_start_seq")
