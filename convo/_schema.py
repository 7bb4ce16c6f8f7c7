"""The schema revision a database has and the one this convo ships, without Alembic.

Opening a store checks both on every start; Alembic (and the migration
scripts it imports) is loaded only when a migration has to run. Importing
this module loads no SQLAlchemy (see ``convo._embedded``). The shipped
head is read from the scripts' ``revision``/``down_revision`` lines; a test
checks it against Alembic's own answer.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from sqlalchemy import Connection

__all__ = ["TABLE_PREFIX", "VERSION_TABLE", "shipped_head", "stored_revision"]

#: Every table of convo's starts so (convo can share a database with its application).
TABLE_PREFIX: Final = "convo_"
#: Alembic's version table, named for convo.
VERSION_TABLE: Final = "convo_alembic_version"

_ASSIGNMENT: Final = re.compile(
    r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+?)\s*$", re.MULTILINE
)
_QUOTED: Final = re.compile(r"""["']([^"']+)["']""")


@functools.cache
def shipped_head() -> str | None:
    """The newest revision among the shipped scripts; None if it is not one clear head."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in resources.files("convo.migrations.versions").iterdir():
        if not script.name.endswith(".py") or script.name.startswith("_"):
            continue
        fields = dict(_ASSIGNMENT.findall(script.read_text(encoding="utf-8")))
        revision = _QUOTED.findall(fields.get("revision", ""))
        if len(revision) != 1:
            return None
        revisions.add(revision[0])
        parents.update(_QUOTED.findall(fields.get("down_revision", "")))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def stored_revision(connection: Connection) -> str | None:
    """The database's schema revision; None without a convo schema (or with several heads)."""
    from sqlalchemy import inspect, text  # not at import: `convo list` reads SQLite without it

    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    return str(rows[0][0]) if len(rows) == 1 else None
