"""The ``convo`` command line: a few lines over the library per command.

Errors go to stderr as one line with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click

from . import _migrations
from ._budget import DEFAULT_MAX_TOKENS
from ._conversation import Conversation
from ._database import ENV_DATABASE_URL, Database, mask, resolve_url
from ._export import FORMATS, ON_CONFLICT, export_history, import_history, message_record
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
    """A turn as JSON: the export's message record."""
    record = message_record(message)
    del record["record"]
    return record


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


def _conversation_json(conv: Conversation) -> dict[str, Any]:
    return {
        "id": conv.id,
        "title": conv.title,
        "user_id": conv.user_id,
        "model": conv.effective_model,
        "messages": conv.message_count,
        "created_at": conv.created_at.isoformat(),
        "updated_at": conv.updated_at.isoformat(),
        "metadata": conv.metadata,
    }


@cli.command()
@click.option("--model", help="Model for this conversation (default: CONVO_MODEL, else convo's).")
@click.option("--system", help="System prompt.")
@click.option("--budget", type=click.IntRange(min=1), help="Input-token budget per request.")
@click.option("--title", help="A title to show in lists.")
@click.option("--user", "user_id", metavar="USER", help="The user it belongs to.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def new(
    model: str | None,
    system: str | None,
    budget: int | None,
    title: str | None,
    user_id: str | None,
    as_json: bool,
    db_url: str | None,
) -> None:
    """Start a conversation and print its id.

    \b
    Example:
      convo new --system "You are terse." --budget 20000 --title "Support #42"
    """
    with _store(db_url) as store:
        conv = store.create(
            model=model, system=system, token_budget=budget, title=title, user_id=user_id
        )
        if as_json:
            _emit_json(_conversation_json(conv))
        else:
            click.echo(conv.id)


@cli.command("send")
@click.argument("conversation_id", metavar="ID")
@click.argument("text", required=False)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Most tokens in the reply.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stored reply as JSON.")
@db_option
def send_command(
    conversation_id: str, text: str | None, max_tokens: int, as_json: bool, db_url: str | None
) -> None:
    """Send TEXT (or '-' for standard input) to a conversation and print the reply.

    The reply streams to standard output as it arrives.

    \b
    Example:
      convo send conv_01JD0000000000000000000000 "What did we decide?"
      git diff | convo send conv_01JD0000000000000000000000 -
    """
    if text is None or text == "-":
        text = sys.stdin.read()
    if not text.strip():
        raise click.UsageError("nothing to send: TEXT is empty")
    with _store(db_url) as store:
        conv = store.get(conversation_id)
        if as_json:
            _emit_json(_message_json(conv.send(text, max_tokens=max_tokens)))
            return
        with conv.stream(text, max_tokens=max_tokens) as reply:
            for delta in reply:
                click.echo(delta, nl=False)
        click.echo()
        if reply.message is not None and reply.message.truncated:
            click.echo("(reply cut off at --max-tokens)", err=True)


@cli.command("list")
@click.option("--user", "user_id", metavar="USER", help="Only this user's conversations.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def list_command(user_id: str | None, limit: int, as_json: bool, db_url: str | None) -> None:
    """List conversations, newest first.

    \b
    Example:
      convo list --user user-42 --limit 5
    """
    with _store(db_url) as store:
        conversations = store.list(user_id=user_id, limit=limit)
    if as_json:
        _emit_json([_conversation_json(c) for c in conversations])
        return
    for conv in conversations:
        updated = f"{conv.updated_at:%Y-%m-%d %H:%M}"
        click.echo(f"{conv.id}  {updated}  {conv.message_count:>6} turns  {conv.title or ''}")


@cli.command()
@click.argument("conversation_ids", metavar="ID...", nargs=-1, required=True)
@db_option
def rm(conversation_ids: tuple[str, ...], db_url: str | None) -> None:
    """Delete conversations with all their turns, archives and summaries.

    \b
    Example:
      convo rm conv_01JD0000000000000000000000
    """
    with _store(db_url) as store:
        for conversation_id in conversation_ids:
            store.delete(conversation_id)
            click.echo(f"deleted {conversation_id}")


def _parse_since(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None else None


@cli.command("export")
@click.argument("conversation_ids", metavar="[ID...]", nargs=-1)
@click.option("--all", "export_all", is_flag=True, help="Every conversation.")
@click.option("--user", "user_id", metavar="USER", help="Only this user's conversations.")
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="Only conversations active since this date (UTC).",
)
@click.option(
    "--format",
    "format_",
    type=click.Choice(FORMATS),
    default="jsonl",
    show_default=True,
    help="jsonl/json (importable), markdown, or anthropic.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="File to write (default: standard output).",
)
@db_option
def export_command(
    conversation_ids: tuple[str, ...],
    export_all: bool,
    user_id: str | None,
    since: datetime | None,
    format_: str,
    output: str,
    db_url: str | None,
) -> None:
    """Export whole histories (archived turns included), streaming.

    \b
    Example:
      convo export --all -o backup.jsonl
      convo export conv_01JD0000000000000000000000 --format markdown
    """
    if conversation_ids and (export_all or user_id or since):
        raise click.UsageError("give conversation IDs, or --all/--user/--since, not both")
    if not conversation_ids and not (export_all or user_id or since):
        raise click.UsageError("say what to export: IDs, or --all (optionally --user/--since)")
    with _store(db_url) as store, click.open_file(output, "w", encoding="utf-8") as out:
        show_progress = output != "-" and sys.stderr.isatty()
        total = (
            sum(store.get(cid).message_count for cid in conversation_ids)
            if conversation_ids
            else store.message_total(user_id=user_id, since=_parse_since(since))
        )
        with click.progressbar(
            length=total,
            label="exporting",
            file=sys.stderr,
            hidden=not show_progress,
            show_pos=True,
        ) as bar:
            conversations, messages = export_history(
                store,
                out,
                conversation_ids=conversation_ids or None,
                user_id=user_id,
                since=_parse_since(since),
                format=format_,  # type: ignore[arg-type]
                on_message=lambda: bar.update(1),
            )
    if output != "-":
        click.echo(f"exported {conversations} conversations, {messages} messages to {output}")


@cli.command("import")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option(
    "--on-conflict",
    type=click.Choice(ON_CONFLICT),
    default="error",
    show_default=True,
    help="What to do with an id that already exists.",
)
@db_option
def import_command(file: Any, on_conflict: str, db_url: str | None) -> None:
    """Import a jsonl or json export. All or nothing.

    \b
    Example:
      convo import backup.jsonl --on-conflict skip
    """
    with _store(db_url) as store:
        if not file.seekable():
            file = io.StringIO(file.read())
        imported, skipped, messages = import_history(
            store,
            file,
            on_conflict=on_conflict,  # type: ignore[arg-type]
        )
    click.echo(f"imported {imported} conversations ({messages} messages); skipped {skipped}")


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _duration(value: str) -> timedelta:
    match = _DURATION.match(value)
    if not match or int(match.group(1)) == 0:
        raise click.BadParameter(f"{value!r} is not a duration like 30d, 12h or 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="AGE",
    help="Age of the last activity: 30d, 12h, 2w...",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@db_option
def prune(older_than: str, dry_run: bool, db_url: str | None) -> None:
    """Delete whole conversations with no activity for AGE (retention).

    \b
    Example:
      convo prune --older-than 90d --dry-run
    """
    age = _duration(older_than)
    with _store(db_url) as store:
        conversations, messages = store.prune(older_than=age, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {conversations} conversations ({messages} messages)")


@cli.command()
@db_option
def verify(db_url: str | None) -> None:
    """Check every conversation: turn numbering and every archive block's checksum.

    Exits non-zero, with a report, on any fault.

    \b
    Example:
      convo verify --db postgresql://app@db.internal/app
    """
    with _store(db_url) as store:
        faults = store.verify()
    if faults:
        for fault in faults:
            click.echo(fault, err=True)
        click.echo(f"{len(faults)} faults found", err=True)
        raise SystemExit(EXIT_ERROR)
    click.echo("all conversations verified: turns numbered without gaps, archives intact")


@cli.command()
@click.argument("query")
@click.option("--conversation", "conversation_id", metavar="ID", help="Only this conversation.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def search(
    query: str, conversation_id: str | None, limit: int, as_json: bool, db_url: str | None
) -> None:
    """Find turns containing every word of QUERY, archived ones included, newest first.

    Uses the database's own full-text index (SQLite FTS5, PostgreSQL
    tsvector, MySQL FULLTEXT).

    \b
    Example:
      convo search "refund policy"
      convo search invoice --conversation conv_01JD0000000000000000000000
    """
    with _store(db_url) as store:
        hits = store.search(query, conversation_id=conversation_id, limit=limit)
    if as_json:
        _emit_json(
            [
                {
                    "conversation_id": h.conversation_id,
                    "seq": h.seq,
                    "role": h.role,
                    "created_at": h.created_at.isoformat(),
                    "snippet": h.snippet,
                }
                for h in hits
            ]
        )
        return
    for hit in hits:
        when = f"{hit.created_at:%Y-%m-%d %H:%M}"
        click.echo(f"{hit.conversation_id} #{hit.seq} {hit.role} {when}  {hit.snippet}")
    if not hits:
        click.echo("no matches", err=True)


def _styled(text: str, **style: Any) -> str:
    """``text`` styled for a terminal, plain when NO_COLOR is set."""
    return text if os.environ.get("NO_COLOR") else click.style(text, **style)


CHAT_HELP = """Commands: /id (this conversation's id), /context (what the next request carries),
/compact (archive and summarize older turns), /stats (usage and cost), /exit (or Ctrl-D).
Ctrl-C while a reply streams stops that reply; its text so far is kept."""


@cli.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@click.option("--model", help="Model for a new conversation.")
@click.option("--system", help="System prompt for a new conversation.")
@click.option("--budget", type=click.IntRange(min=1), help="Token budget for a new conversation.")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Most tokens per reply.",
)
@db_option
def chat(
    conversation_id: str | None,
    model: str | None,
    system: str | None,
    budget: int | None,
    max_tokens: int,
    db_url: str | None,
) -> None:
    """Chat interactively, streaming replies; continue conversation ID or start one.

    Needs ANTHROPIC_API_KEY. In the chat: /id, /context, /compact, /stats,
    /exit. Ctrl-C during a reply stops it (the partial text is kept).

    \b
    Example:
      convo chat --system "You are a patient tutor."
      convo chat conv_01JD0000000000000000000000
    """
    with _store(db_url) as store:
        store.client  # noqa: B018 - says which key to set before anything starts
        if conversation_id:
            conv = store.get(conversation_id)
            click.echo(f"Continuing {conv.id} ({conv.message_count} turns). /help for commands.")
        else:
            conv = store.create(model=model, system=system, token_budget=budget)
            click.echo(f"New conversation {conv.id}. /help for commands.")
        while True:
            try:
                line = input(_styled("you> ", fg="green", bold=True))
            except (EOFError, KeyboardInterrupt):
                click.echo()
                break
            command = line.strip()
            if not command:
                continue
            if command.startswith("/"):
                if not _chat_command(conv, command):
                    break
                continue
            _chat_turn(conv, line, max_tokens)
        click.echo(f"Bye. Continue with: convo chat {conv.id}")


def _chat_command(conv: Conversation, command: str) -> bool:
    """Run an in-chat command; False to leave the chat."""
    name = command.split()[0]
    if name in ("/exit", "/quit"):
        return False
    try:
        if name == "/id":
            click.echo(conv.id)
        elif name == "/context":
            _show_context(conv, as_json=False)
        elif name == "/compact":
            done = conv.compact()
            click.echo(
                "Nothing to compact."
                if done is None
                else f"Archived turns {done.first_seq}-{done.last_seq} and summarized them."
            )
        elif name == "/stats":
            total = conv.store.usage(conversation_id=conv.id).total
            click.echo(
                f"{total.requests} requests, {total.total_input_tokens:,} input tokens "
                f"({_format_ratio(total.cache_hit_ratio)} from cache), "
                f"{total.output_tokens:,} output tokens, cost {_format_cost(total.cost_usd)}"
            )
        else:
            click.echo(CHAT_HELP)
    except ConvoError as exc:
        click.echo(f"Error: {exc}", err=True)
    return True


def _chat_turn(conv: Conversation, text: str, max_tokens: int) -> None:
    click.echo(_styled("claude> ", fg="blue", bold=True), nl=False)
    try:
        with conv.stream(text, max_tokens=max_tokens) as reply:
            for delta in reply:
                click.echo(delta, nl=False)
        click.echo()
    except KeyboardInterrupt:
        click.echo(_styled(" [stopped; the text so far is kept]", dim=True))
    except ConvoError as exc:
        click.echo()
        click.echo(f"Error: {exc}", err=True)


def main() -> None:
    """Entry point of the ``convo`` console script."""
    cli(prog_name="convo")


if __name__ == "__main__":  # pragma: no cover
    main()
