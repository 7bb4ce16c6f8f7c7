"""The ``convo`` command line: a few lines over the library per command.

Errors go to stderr as one line with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import _migrations
from ._database import ENV_DATABASE_URL, Database, mask, resolve_url
from ._version import __version__
from .errors import ConvoError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code for a convo error (bad input, database problems); click uses 2 for usage errors.
EXIT_ERROR = 1


class ConvoGroup(click.Group):
    """A group whose commands report convo's errors as one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConvoError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


def db_option(function: F) -> F:
    """``--db URL``: the database, else CONVO_DATABASE_URL, else the embedded SQLite file."""
    return click.option(
        "--db",
        "db_url",
        metavar="URL",
        envvar=ENV_DATABASE_URL,
        show_envvar=True,
        help="Database URL. Default: $CONVO_DATABASE_URL, else the embedded SQLite file.",
    )(function)


@click.group(cls=ConvoGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convo")
def cli() -> None:
    """Durable, budget-aware conversations for the Claude Messages API.

    \b
    Example:
      convo db upgrade --db postgresql://app@db.internal/app
    """


@cli.group(cls=ConvoGroup)
def db() -> None:
    """Manage the database schema (Alembic migrations shipped with convo).

    \b
    Example:
      convo db upgrade
      convo db current --db postgresql://app@db.internal/app
    """


def _database(db_url: str | None, *, allow_other_tables: bool = False) -> Database:
    return Database(resolve_url(db_url), allow_other_tables=allow_other_tables)


@db.command()
@click.argument("revision", default="head")
@db_option
def upgrade(revision: str, db_url: str | None) -> None:
    """Upgrade the schema to REVISION (default: the newest).

    Creates convo's tables (all prefixed convo_) in an empty database, or
    beside the tables of the application that shares it.

    \b
    Example:
      convo db upgrade --db postgresql://app@db.internal/app
    """
    database = _database(db_url, allow_other_tables=True)
    try:
        _migrations.upgrade(database, revision)
        click.echo(f"{mask(database.url)} is at revision {_current(database)}")
    finally:
        database.close()


@db.command()
@click.argument("revision")
@db_option
def downgrade(revision: str, db_url: str | None) -> None:
    """Downgrade the schema to REVISION ('base' removes every convo table and its data).

    \b
    Example:
      convo db downgrade 0001
    """
    database = _database(db_url)
    try:
        _migrations.downgrade(database, revision)
        click.echo(f"{mask(database.url)} is at revision {_current(database) or 'base'}")
    finally:
        database.close()


def _current(database: Database) -> str | None:
    with database.transaction() as session:
        return _migrations.schema_revision(session.connection())


@db.command()
@db_option
def current(db_url: str | None) -> None:
    """Show the database's schema revision and whether it is the newest.

    \b
    Example:
      convo db current
    """
    database = _database(db_url)
    try:
        revision = _current(database)
    finally:
        database.close()
    head = _migrations.head_revision()
    if revision is None:
        click.echo(f"none (no convo schema; run `convo db upgrade`, newest is {head})")
    elif revision == head:
        click.echo(f"{revision} (head)")
    else:
        click.echo(f"{revision} (behind: newest is {head}; run `convo db upgrade`)")


@db.command()
def history() -> None:
    """List the migrations that ship with this convo, newest first.

    \b
    Example:
      convo db history
    """
    click.echo(_migrations.history().rstrip())


@db.command()
@db_option
def check(db_url: str | None) -> None:
    """Check that the database schema matches this convo's models exactly.

    Exits non-zero if migrations are pending or the schema has drifted.

    \b
    Example:
      convo db check --db postgresql://app@db.internal/app
    """
    database = _database(db_url)
    try:
        _migrations.check(database)
    finally:
        database.close()
    head = _migrations.head_revision()
    click.echo(f"{mask(database.url)} matches convo's schema (revision {head})")


def main() -> None:
    """Entry point of the ``convo`` console script."""
    cli(prog_name="convo")


if __name__ == "__main__":  # pragma: no cover
    main()
