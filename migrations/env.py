"""Alembic environment for convo.

Used two ways: by convo itself (``convo db ...`` and the store's automatic
upgrade of the embedded SQLite file), which hands over an open connection in
``config.attributes["connection"]``; and by ``alembic`` run from the
repository root, where the URL comes from ``-x db=URL``, then
``CONVO_DATABASE_URL``, then the embedded SQLite file.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from convo._database import Database, resolve_url
from convo._models import Base
from convo._schema import TABLE_PREFIX, VERSION_TABLE

FULL_TEXT_PREFIX = "convo_search_fts"

config = context.config
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    # convo may share a database with its application: only its own tables.
    # The full-text index objects (convo_search_fts*) are per dialect and made
    # by hand in migration 0004, not from the models.
    if name is not None and name.startswith(FULL_TEXT_PREFIX):
        return False
    if type_ == "table":
        return name is not None and name.startswith(TABLE_PREFIX)
    return True


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        **kwargs,
    )


def _run(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    given = context.get_x_argument(as_dictionary=True).get("db")
    return resolve_url(given or config.get_main_option("sqlalchemy.url") or None).render_as_string(
        hide_password=False
    )


if context.is_offline_mode():
    _configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        database = Database(resolve_url(_url()))
        try:
            with database.migration_connection() as own_connection:
                _run(own_connection)
        finally:
            database.close()
