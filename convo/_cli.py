"""The ``convo`` command line: a few lines over the library per command.

Errors go to stderr as one line with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from . import _migrations
from ._conversation import Conversation
from ._database import ENV_DATABASE_URL, Database, mask, resolve_url
from ._message import Message
from ._store import ConversationStore
from ._summarizer import ExtractiveSummarizer, SummaryTurn, transcript
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


def _store(db_url: str | None, **options: Any) -> ConversationStore:
    return ConversationStore(db_url, **options)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2, default=str))


def _message_json(message: Message) -> dict[str, Any]:
    return {
        "seq": message.seq,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "token_count": message.token_count,
        "created_at": message.created_at.isoformat(),
        "model": message.model,
        "stop_reason": message.stop_reason,
        "usage": message.usage,
        "request_id": message.request_id,
    }


def _turn_text(message: Message) -> str:
    rendered = transcript([SummaryTurn(message.seq, message.role, message.content)])
    return rendered.split(": ", 1)[1] if ": " in rendered else rendered


@cli.command()
@click.argument("conversation_id", metavar="ID")
@click.option(
    "--context",
    "show_context",
    is_flag=True,
    help="Show the window the next API call would send, with token counts.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def show(conversation_id: str, show_context: bool, as_json: bool, db_url: str | None) -> None:
    """Show a conversation's full history (archived turns included).

    With --context, show instead what the next request would carry: the
    system prompt, the summary of archived turns, and the live turns, each
    with its token count. Nothing is sent and nothing is compacted.

    \b
    Example:
      convo show conv_01JD0000000000000000000000
      convo show conv_01JD0000000000000000000000 --context
    """
    with _store(db_url) as store:
        conv = store.get(conversation_id)
        if show_context:
            _show_context(conv, as_json)
            return
        if as_json:
            _emit_json([_message_json(m) for m in conv.iter_history()])
            return
        title = f" - {conv.title}" if conv.title else ""
        click.echo(f"{conv.id}{title} ({conv.message_count} turns)")
        for message in conv.iter_history():
            status = "" if message.status == "complete" else f" [{message.status}]"
            click.echo(f"\n#{message.seq} {message.role}{status}")
            click.echo(_turn_text(message))


def _show_context(conv: Conversation, as_json: bool) -> None:
    window = conv.window(compact=False)
    summary = conv.summary()
    parts = {
        "model": window.params["model"],
        "budget": window.budget,
        "estimated_tokens": window.estimated_tokens,
        "system_tokens": window.system_tokens,
        "summary_tokens": window.summary_tokens,
        "summary_covers_turns": [1, window.summary_through_seq] if summary else None,
        "message_tokens": window.message_tokens,
        "live_turns": [window.first_seq, window.last_seq] if window.first_seq else None,
        "omitted_turns": list(window.omitted_seqs),
        "request": window.params,
    }
    if as_json:
        _emit_json(parts)
        return
    click.echo(f"{conv.id} -> {parts['model']}")
    click.echo(f"estimated input: {window.estimated_tokens:,} of a {window.budget:,}-token budget")
    click.echo(f"  system prompt: {window.system_tokens:,} tokens")
    if summary:
        click.echo(
            f"  summary of turns 1-{window.summary_through_seq}: {window.summary_tokens:,} tokens"
        )
        click.echo("    " + summary.replace("\n", "\n    "))
    else:
        click.echo("  summary: none (nothing archived yet)")
    if window.first_seq is not None:
        click.echo(
            f"  live turns {window.first_seq}-{window.last_seq}: "
            f"{window.message_tokens:,} tokens in {len(window.params['messages'])} messages"
        )
    if window.omitted_seqs:
        click.echo(
            f"  left out to fit (stored, not sent): turns {window.omitted_seqs[0]}-"
            f"{window.omitted_seqs[-1]}; run `convo compact {conv.id}`"
        )


@cli.command()
@click.argument("conversation_id", metavar="ID")
@click.option(
    "--offline",
    is_flag=True,
    help="Summarize with the offline extractive summarizer instead of Claude.",
)
@db_option
def compact(conversation_id: str, offline: bool, db_url: str | None) -> None:
    """Archive a conversation's older turns now and summarize them.

    Everything before the latest exchange moves into a compressed archive
    block (history stays complete) and a new rolling summary stands in for
    it in requests. The summary is written by Claude (ANTHROPIC_API_KEY),
    or with --offline by an extractive summarizer that needs no key.

    \b
    Example:
      convo compact conv_01JD0000000000000000000000 --offline
    """
    options: dict[str, Any] = {"summarizer": ExtractiveSummarizer()} if offline else {}
    with _store(db_url, **options) as store:
        done = store.get(conversation_id).compact()
    if done is None:
        click.echo("Nothing to compact: only the latest exchange is live.")
    else:
        click.echo(
            f"Archived turns {done.first_seq}-{done.last_seq} "
            f"({done.raw_bytes:,} bytes -> {done.stored_bytes:,} stored) "
            f"summarized by the {done.summarizer} summarizer."
        )


def _format_cost(cost: Any) -> str:
    return "unknown" if cost is None else f"${cost:.4f}"


def _format_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


@cli.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@click.option(
    "--by",
    "group_by",
    type=click.Choice(["conversation", "model", "day"]),
    help="Also break the totals down by conversation, model or day.",
)
@click.option("--user", "user_id", metavar="USER", help="Only this user's conversations.")
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="Only calls from this date (UTC) on.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def stats(
    conversation_id: str | None,
    group_by: str | None,
    user_id: str | None,
    since: datetime | None,
    as_json: bool,
    db_url: str | None,
) -> None:
    """Show API usage: requests, tokens by kind, cache hits, cost, errors, latency.

    For one conversation (ID) or all of them. Cost uses the price table
    (unknown for a model without a price, never a guess); summaries Claude
    wrote for compaction are counted too.

    \b
    Example:
      convo stats --by day --since 2026-11-01
      convo stats conv_01JD0000000000000000000000 --json
    """
    with _store(db_url) as store:
        report = store.usage(
            conversation_id=conversation_id,
            user_id=user_id,
            since=since.replace(tzinfo=UTC) if since else None,
            group_by=group_by,  # type: ignore[arg-type]
        )
    rows = [*report.groups, report.total]
    if as_json:
        _emit_json(
            {"total": report.total.as_dict(), "groups": [g.as_dict() for g in report.groups]}
        )
        return
    header = (
        "",
        "requests",
        "errors",
        "input",
        "cache write",
        "cache read",
        "output",
        "cache hit",
        "cost",
        "p50 ms",
        "p95 ms",
    )
    table = [header] + [
        (
            row.key,
            str(row.requests),
            str(row.errors),
            f"{row.input_tokens:,}",
            f"{row.cache_creation_input_tokens:,}",
            f"{row.cache_read_input_tokens:,}",
            f"{row.output_tokens:,}",
            _format_ratio(row.cache_hit_ratio),
            _format_cost(row.cost_usd),
            str(row.latency_p50_ms or "-"),
            str(row.latency_p95_ms or "-"),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        click.echo("  ".join(cells).rstrip())


def main() -> None:
    """Entry point of the ``convo`` console script."""
    cli(prog_name="convo")


if __name__ == "__main__":  # pragma: no cover
    main()
