"""The ``convo`` command line: a few lines over the library per command.

Errors go to stderr as one line with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar

import click

from . import _repl
from ._budget import DEFAULT_MAX_TOKENS
from ._humanize import parse_age, plural
from .errors import ConvoError, InvalidInput

# The library is imported inside the commands: `convo --help` needs none of it,
# and only the commands that call the API load the SDK.
if TYPE_CHECKING:
    from ._conversation import Conversation
    from ._database import Database
    from ._embedded import Listed
    from ._message import Message
    from ._recall import RecallHit
    from ._search import SearchHit
    from ._sending import ConversationStream
    from ._store import ConversationStore

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: Exit code for a convo error (bad input, database problems); click uses 2 for usage errors.
EXIT_ERROR = 1
#: Read by ``--db`` (the same name as ``convo._database.ENV_DATABASE_URL``).
ENV_DATABASE_URL = "CONVO_DATABASE_URL"


class _LogHandler(logging.Handler):
    """convo's warnings as one formatted line on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:  # pragma: no cover - logging must never break a command
            self.handleError(record)


def _setup_logging() -> None:
    logger = logging.getLogger("convo")
    if not any(isinstance(h, _LogHandler) for h in logger.handlers):
        handler = _LogHandler(logging.WARNING)
        handler.setFormatter(logging.Formatter("convo: %(levelname)s: %(message)s"))
        logger.addHandler(handler)


class _LazyChoice(click.Choice):  # type: ignore[type-arg]
    """A click.Choice whose choices come from a module imported only when they are needed."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> Sequence[str]:
        return tuple(self._load())

    @choices.setter
    def choices(self, _value: Sequence[str]) -> None:
        pass


def _export_formats() -> Sequence[str]:
    from ._export import FORMATS

    return FORMATS


def _conflict_modes() -> Sequence[str]:
    from ._export import ON_CONFLICT

    return ON_CONFLICT


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C (a partial reply is kept, the claim released)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def handle_termination() -> None:
    """Turn SIGTERM and SIGHUP (a closed terminal) into :class:`Terminated` in this process."""
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, _terminate)


class ConvoGroup(click.Group):
    """A group whose commands report convo's errors as one line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConvoError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_ERROR)
        except Terminated as exc:
            click.echo(f"Terminated by {signal.Signals(exc.signum).name}.", err=True)
            ctx.exit(128 + exc.signum)
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
@click.version_option(package_name="convo-store", prog_name="convo")
def cli() -> None:
    """Durable, budget-aware conversations for the Claude Messages API.

    \b
    Example:
      convo db upgrade --db postgresql://app@db.internal/app
    """
    _setup_logging()


def continue_option(function: F) -> F:
    """``-c``: the conversation with the latest activity instead of an ID."""
    return click.option(
        "-c",
        "--continue",
        "continue_latest",
        is_flag=True,
        help="Continue the conversation with the latest activity.",
    )(function)


def date_option(name: str, help: str) -> Callable[[F], F]:
    """A date (UTC) option: 2026-11-01 or 2026-11-01T12:00:00."""
    return click.option(
        name, type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]), help=help
    )


def yes_option(function: F) -> F:
    """``--yes``: skip the confirmation of a command that deletes data."""
    return click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(function)


def _confirm(question: str, yes: bool) -> None:
    """Ask before deleting data; refuse without a terminal unless --yes was given."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(
            f"{question} Refusing without --yes: standard input is not a terminal."
        )
    click.confirm(question, abort=True, err=True)


def _conversation(
    store: ConversationStore, reference: str | None, continue_latest: bool = False
) -> Conversation:
    """The conversation an ID (or any unique prefix of it) names, or with -c the latest."""
    if continue_latest:
        if reference:
            raise click.UsageError("give an ID or -c/--continue, not both")
        latest = store.latest()
        if latest is None:
            raise click.UsageError("there is no conversation to continue yet")
        return latest
    if not reference:
        raise click.UsageError("missing the conversation ID (or -c for the latest)")
    return store.find(reference)


def _apply(conv: Conversation, model: str | None, system: str | None) -> None:
    """--model/--system on an existing conversation: they hold from now on."""
    changes: dict[str, Any] = {
        k: v for k, v in (("model", model), ("system", system)) if v is not None
    }
    if changes:
        conv.update(**changes)


@cli.group(cls=ConvoGroup)
def db() -> None:
    """Manage the database schema (Alembic migrations shipped with convo).

    \b
    Example:
      convo db upgrade
      convo db current --db postgresql://app@db.internal/app
    """


def _database(db_url: str | None, *, allow_other_tables: bool = False) -> Database:
    from ._database import Database, resolve_url

    return Database(resolve_url(db_url), allow_other_tables=allow_other_tables)


def _mask(database: Database) -> str:
    from ._database import mask

    return mask(database.url)


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
    from . import _migrations

    database = _database(db_url, allow_other_tables=True)
    try:
        _migrations.upgrade(database, revision)
        click.echo(f"{_mask(database)} is at revision {_current(database)}")
    finally:
        database.close()


@db.command()
@click.argument("revision")
@yes_option
@db_option
def downgrade(revision: str, yes: bool, db_url: str | None) -> None:
    """Downgrade the schema to REVISION ('base' removes every convo table and its data).

    Asks first (a downgrade can drop data); --yes skips the question.

    \b
    Example:
      convo db downgrade 0001
      convo db downgrade base --yes
    """
    from . import _migrations

    database = _database(db_url)
    try:
        what = "every convo table and its data" if revision == "base" else "data"
        _confirm(f"Downgrade {_mask(database)} to {revision}? This can delete {what}.", yes)
        _migrations.downgrade(database, revision)
        click.echo(f"{_mask(database)} is at revision {_current(database) or 'base'}")
    finally:
        database.close()


def _current(database: Database) -> str | None:
    from . import _migrations

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
    from . import _migrations

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
    from . import _migrations

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
    from . import _migrations

    database = _database(db_url)
    try:
        _migrations.check(database)
    finally:
        database.close()
    head = _migrations.head_revision()
    click.echo(f"{_mask(database)} matches convo's schema (revision {head})")


@db.command("path")
@db_option
def path_command(db_url: str | None) -> None:
    """Print where the database is: the embedded SQLite file's path, or the URL.

    The URL's password is never printed.

    \b
    Example:
      convo db path
    """
    from ._database import mask, resolve_url, sqlite_file

    url = resolve_url(db_url)
    click.echo(sqlite_file(url) or mask(url))


def _store(db_url: str | None, **options: Any) -> ConversationStore:
    from ._store import ConversationStore

    return ConversationStore(db_url, **options)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2, default=str))


def _message_json(message: Message) -> dict[str, Any]:
    """A turn as JSON: the export's message record."""
    from ._export import message_record

    record = message_record(message)
    del record["record"]
    return record


def _turn_text(message: Message) -> str:
    from ._summarizer import SummaryTurn, transcript

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
    system prompt, the summary of archived turns, the live turns and the
    earlier turns recalled for the newest user turn, each with its token
    count. Nothing is sent and nothing is compacted.

    \b
    Example:
      convo show conv_01JD0000000000000000000000
      convo show conv_01JD0000000000000000000000 --context
    """
    with _store(db_url) as store:
        conv = _conversation(store, conversation_id)
        if show_context:
            _show_context(conv, as_json)
            return
        if as_json:
            _emit_json(
                {
                    "conversation": _conversation_state_json(conv),
                    "messages": [_message_json(m) for m in conv.iter_history()],
                }
            )
            return
        title = f" - {conv.title}" if conv.title else ""
        click.echo(f"{conv.id}{title} ({plural(conv.message_count, 'turn')})")
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
        "recall_tokens": window.recall_tokens,
        "recalled": [_hit_json(h) for h in window.recalled],
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
    if window.recalled:
        click.echo(
            f"  recalled earlier turns (after the last cache breakpoint): "
            f"{window.recall_tokens:,} tokens"
        )
        for hit in window.recalled:
            click.echo("    " + _hit_line(hit))
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

    Everything before the latest exchange moves into compressed archive
    blocks (history stays complete) and a new rolling summary stands in for
    it in requests. The summary is written by Claude (ANTHROPIC_API_KEY),
    or with --offline by an extractive summarizer that needs no key. A long
    backlog is summarized in chunks, each saved as soon as it is done (a
    progress bar shows them on a terminal); an interrupted run keeps them.

    \b
    Example:
      convo compact conv_01JD0000000000000000000000 --offline
    """
    from ._summarizer import ExtractiveSummarizer

    options: dict[str, Any] = {"summarizer": ExtractiveSummarizer()} if offline else {}
    with _store(db_url, **options) as store:
        conv = _conversation(store, conversation_id)
        with click.progressbar(
            length=max(conv.message_count - conv.archived_through_seq, 1),
            label="compacting (turns)",
            file=sys.stderr,
            hidden=not sys.stderr.isatty(),
            show_pos=True,
        ) as bar:

            def progress(archived: int, total: int) -> None:
                bar.length = max(total, 1)
                bar.update(archived - bar.pos)

            done = _offline_hint(lambda: conv.compact(progress=progress), offline)
    if done is None:
        click.echo("Nothing to compact: only the latest exchange is live.")
    else:
        click.echo(
            f"Archived turns {done.first_seq}-{done.last_seq} "
            f"({done.raw_bytes:,} bytes -> {done.stored_bytes:,} stored) "
            f"summarized by the {done.summarizer} summarizer."
        )


def _offline_hint(compact: Callable[[], T], offline: bool) -> T:
    """Run a compaction; without an API key, say that --offline needs none."""
    from .errors import SummarizerFailed

    try:
        return compact()
    except SummarizerFailed as exc:
        if offline or "MissingAPIKey" not in str(exc):
            raise
        raise SummarizerFailed(f"{exc}. Without a key, use --offline") from exc


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
            conversation_id=_conversation(store, conversation_id).id if conversation_id else None,
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


def _conversation_json(conv: Conversation | Listed) -> dict[str, Any]:
    """A conversation as JSON, as ``convo list --json`` shows it."""
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


def _conversation_state_json(conv: Conversation) -> dict[str, Any]:
    """:func:`_conversation_json` with the system prompt, budget and summary state."""
    return _conversation_json(conv) | {
        "system": conv.system,
        "token_budget": conv.token_budget,
        "budget": conv.budget(),
        "archived_through_seq": conv.archived_through_seq,
        "summary": conv.summary(),
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
@click.argument("conversation_id", metavar="ID", required=False)
@click.argument("text", required=False)
@continue_option
@click.option("--model", help="Use this model from now on in this conversation.")
@click.option("--system", help="Use this system prompt from now on in this conversation.")
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="PATH",
    help="Attach an image (JPEG, PNG, GIF, WebP), a PDF or a text file; repeat for more.",
)
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
    conversation_id: str | None,
    text: str | None,
    continue_latest: bool,
    model: str | None,
    system: str | None,
    files: tuple[str, ...],
    max_tokens: int,
    as_json: bool,
    db_url: str | None,
) -> None:
    """Send TEXT (or '-' for standard input) to conversation ID and print the reply.

    The reply streams to standard output as it arrives. ID may be any unique
    prefix of the id; -c sends to the conversation with the latest activity.

    \b
    Example:
      convo send conv_01JD0000000000000000000000 "What did we decide?"
      convo send -c "And after that?"
      git diff | convo send 01JD8X -
      convo send -c "What is in this picture?" --file photo.png
    """
    from ._attachments import file_block

    if continue_latest and text is None:
        conversation_id, text = None, conversation_id
    if text == "-" or (text is None and not files):
        text = sys.stdin.read()
    content: list[Any] = [file_block(path) for path in files]
    if text and text.strip():
        content.append({"type": "text", "text": text})
    if not content:
        raise click.UsageError("nothing to send: TEXT is empty")
    with _store(db_url) as store:
        conv = _conversation(store, conversation_id, continue_latest)
        _apply(conv, model, system)
        if as_json:
            _emit_json(_message_json(conv.send(content, max_tokens=max_tokens)))
            return
        with conv.stream(content, max_tokens=max_tokens) as reply:
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
    from ._embedded import list_conversations

    # The embedded file at the current schema is read without loading the store.
    conversations: Sequence[Conversation | Listed] | None = list_conversations(
        db_url, user_id=user_id, limit=limit
    )
    if conversations is None:
        with _store(db_url) as store:
            conversations = store.list(user_id=user_id, limit=limit)
    if as_json:
        _emit_json([_conversation_json(c) for c in conversations])
        return
    if not conversations:
        who = f" for user {user_id}" if user_id else ""
        click.echo(f"No conversations{who} yet. Start one with `convo chat` or `convo new`.")
        return
    click.echo(f"{'ID':<31} {'LAST ACTIVE (UTC)':<17} {'TURNS':>6}  TITLE")
    for conv in conversations:
        updated = f"{conv.updated_at:%Y-%m-%d %H:%M}"
        click.echo(f"{conv.id:<31} {updated:<17} {conv.message_count:>6}  {conv.title or ''}")


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
        for reference in conversation_ids:
            conversation_id = _conversation(store, reference).id
            store.delete(conversation_id)
            click.echo(f"deleted {conversation_id}")


@cli.command()
@click.argument("conversation_id", metavar="ID")
@click.argument("seq", type=click.IntRange(min=1))
@click.argument("text", required=False)
@db_option
def edit(conversation_id: str, seq: int, text: str | None, db_url: str | None) -> None:
    """Replace the text of turn SEQ with TEXT ('-' reads standard input; none opens $EDITOR).

    Only live turns can change (archived ones are in checksummed blocks and
    the summary was written from them); a tool call or result keeps its ids.

    \b
    Example:
      convo edit 01JD8X 3 "What about Porto?"
    """
    with _store(db_url) as store:
        conv = _conversation(store, conversation_id)
        if text == "-":
            text = sys.stdin.read()
        elif text is None:
            current = next(conv.store.records.history(conv.id, after=seq - 1), None)
            text = click.edit(_turn_text(current) if current and current.seq == seq else "")
        if text is None or not text.strip():
            raise click.UsageError("nothing to store: the new text is empty")
        message = conv.edit(seq, text)
    click.echo(f"turn {message.seq} ({message.role}) updated")


@cli.command("delete-turn")
@click.argument("conversation_id", metavar="ID")
@click.argument("seq", type=click.IntRange(min=1))
@yes_option
@db_option
def delete_turn(conversation_id: str, seq: int, yes: bool, db_url: str | None) -> None:
    """Delete turn SEQ (a tool call and its result go together); later turns move up.

    Only live turns can be deleted. Asks first; --yes skips the question.

    \b
    Example:
      convo delete-turn 01JD8X 5 --yes
    """
    with _store(db_url) as store:
        conv = _conversation(store, conversation_id)
        _confirm(f"Delete turn {seq} of {conv.id}?", yes)
        deleted = conv.delete_turn(seq)
    click.echo(f"deleted {plural(len(deleted), 'turn')} ({deleted[0]}-{deleted[-1]}) of {conv.id}")


@cli.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@continue_option
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Most tokens in the reply.",
)
@db_option
def regenerate(
    conversation_id: str | None, continue_latest: bool, max_tokens: int, db_url: str | None
) -> None:
    """Replace the last reply: send the turn it answered again.

    The old reply is deleted only once the new one is stored: if the call
    fails, nothing changes.

    \b
    Example:
      convo regenerate -c
    """
    with _store(db_url) as store:
        conv = _conversation(store, conversation_id, continue_latest)
        with conv.regenerate_stream(max_tokens=max_tokens) as reply:
            for delta in reply:
                click.echo(delta, nl=False)
        click.echo()


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
    type=_LazyChoice(_export_formats),
    default="jsonl",
    show_default=True,
    help="jsonl/json (importable), markdown, or anthropic.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="File to write (default: standard output). Written whole or not at all.",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Leave out conversations that cannot be read (corrupted) and list them, "
    "instead of failing.",
)
@db_option
def export_command(
    conversation_ids: tuple[str, ...],
    export_all: bool,
    user_id: str | None,
    since: datetime | None,
    format_: str,
    output: str,
    skip_bad: bool,
    db_url: str | None,
) -> None:
    """Export whole histories (archived turns included), streaming.

    jsonl and json carry the archive blocks and summaries too, and end with a
    record that import checks, so a truncated file is refused. A file given
    with -o appears only once the export is complete.

    \b
    Example:
      convo export --all -o backup.jsonl
      convo export conv_01JD0000000000000000000000 --format markdown
    """
    if conversation_ids and (export_all or user_id or since):
        raise click.UsageError("give conversation IDs, or --all/--user/--since, not both")
    if not conversation_ids and not (export_all or user_id or since):
        raise click.UsageError("say what to export: IDs, or --all (optionally --user/--since)")
    from ._export import export_history

    with _store(db_url) as store, _output_file(output) as out:
        conversation_ids = tuple(_conversation(store, c).id for c in conversation_ids)
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
            done = export_history(
                store,
                out,
                conversation_ids=conversation_ids or None,
                user_id=user_id,
                since=_parse_since(since),
                format=format_,  # type: ignore[arg-type]
                skip_bad=skip_bad,
                on_message=lambda: bar.update(1),
            )
    for conversation_id, problem in done.skipped:
        click.echo(f"skipped {conversation_id}: {problem}", err=True)
    if output != "-":
        click.echo(
            f"exported {plural(done.conversations, 'conversation')}, "
            f"{plural(done.messages, 'message')} to {output}"
            + (f" ({len(done.skipped)} skipped)" if done.skipped else "")
        )


@contextlib.contextmanager
def _output_file(path: str) -> Iterator[IO[str]]:
    """Standard output, or a file that appears (whole) only if the block succeeds."""
    if path == "-":
        with click.open_file("-", "w", encoding="utf-8") as stdout:
            yield stdout
        return
    target = os.path.abspath(path)
    try:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - renamed or removed below
            "w",
            encoding="utf-8",
            newline="",
            dir=os.path.dirname(target),
            prefix=f".{os.path.basename(target)}.",
            suffix=".partial",
            delete=False,
        )
    except OSError as exc:
        raise click.FileError(path, exc.strerror or str(exc)) from None
    try:
        with handle:
            yield handle
        os.replace(handle.name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


@cli.command("import")
@click.argument("file", type=click.File("rb"))
@click.option(
    "--on-conflict",
    type=_LazyChoice(_conflict_modes),
    default="error",
    show_default=True,
    help="What to do with an id that already exists.",
)
@db_option
def import_command(file: Any, on_conflict: str, db_url: str | None) -> None:
    """Import an export, or another tool's history. All or nothing.

    FILE is a convo jsonl/json export (gzip-compressed or not), a Messages
    API messages list or request body, or the output of simonw/llm's
    `llm logs --json`; `-` reads standard input. Every turn is checked as
    `add` checks it.

    \b
    Example:
      convo import backup.jsonl --on-conflict skip
      gunzip -c backup.jsonl.gz | convo import -
      llm logs -n 0 --json | convo import -
    """
    from ._export import import_history

    with _store(db_url) as store:
        imported, skipped, messages = import_history(
            store,
            file,
            on_conflict=on_conflict,  # type: ignore[arg-type]
        )
    click.echo(
        f"imported {plural(imported, 'conversation')} ({plural(messages, 'message')}); "
        f"skipped {skipped}"
    )


def _age(_ctx: click.Context, _param: click.Parameter, value: str) -> Any:
    try:
        return parse_age(value)
    except InvalidInput as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="AGE",
    callback=_age,
    help="Time since the last activity: 90d, 6mo, 1y, 2w, 12h, 30min (a bare 'm' is refused).",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@yes_option
@db_option
def prune(older_than: Any, dry_run: bool, yes: bool, db_url: str | None) -> None:
    """Delete whole conversations with no activity for AGE (retention).

    Lists what goes and asks first; --yes skips the question, --dry-run
    only lists. Units: min, h, d, w, mo (30 days), y (365 days).

    \b
    Example:
      convo prune --older-than 6mo --dry-run
      convo prune --older-than 90d --yes
    """
    with _store(db_url) as store:
        stale = store.stale(older_than=older_than)
        for conv in stale:
            click.echo(
                f"{conv.id}  {conv.updated_at:%Y-%m-%d %H:%M}  "
                f"{plural(conv.message_count, 'turn'):>10}  {conv.title or ''}"
            )
        what = (
            f"{plural(len(stale), 'conversation')} "
            f"({plural(sum(c.message_count for c in stale), 'message')})"
        )
        if dry_run or not stale:
            click.echo(f"would delete {what}" if stale else "nothing to delete")
            return
        _confirm(f"Delete {what}?", yes)
        conversations, messages = store.delete_many([c.id for c in stale])
    click.echo(f"deleted {plural(conversations, 'conversation')} ({plural(messages, 'message')})")


@cli.command()
@click.option(
    "--replay", is_flag=True, help="First write the replies pending in the outbox, then check."
)
@db_option
def verify(replay: bool, db_url: str | None) -> None:
    """Check every conversation: turn numbering, every archive block's checksum, and
    replies pending in the outbox (billed, not yet written).

    Exits non-zero, with a report, on any fault.

    \b
    Example:
      convo verify --db postgresql://app@db.internal/app
      convo verify --replay
    """
    with _store(db_url, auto_replay=False) as store:
        if replay:
            written = store.replay_outbox()
            click.echo(f"wrote {written} pending replies from the outbox")
        faults = store.verify()
        pending = store.pending_replies()
    for entry in pending:
        faults.append(
            f"{entry.conversation_id}: a reply to turn {entry.user_seq} is pending in the outbox "
            f"since {entry.created_at} (not in the database yet): run `convo outbox replay`"
        )
    if faults:
        for fault in faults:
            click.echo(fault, err=True)
        click.echo(f"{plural(len(faults), 'fault')} found", err=True)
        raise SystemExit(EXIT_ERROR)
    click.echo("all conversations verified: turns numbered without gaps, archives intact")


@cli.command()
@click.argument("conversation_id", metavar="ID")
@db_option
def unlock(conversation_id: str, db_url: str | None) -> None:
    """Clear a send's claim on a conversation, left by a sender that died.

    A live sender renews its claim; clear one only if its process is gone
    (a dead sender's claim also lapses by itself within the store's lease).

    \b
    Example:
      convo unlock conv_01JD0000000000000000000000
    """
    with _store(db_url) as store:
        released = store.get(conversation_id).release_claim(force=True)
    click.echo(
        f"released the send claim on {conversation_id}"
        if released
        else f"{conversation_id} had no send claim"
    )


@cli.command()
@click.argument("conversation_id", metavar="ID")
@click.argument("seq", type=click.IntRange(min=1))
@click.option("--include", is_flag=True, help="Send the turn again (undo an exclusion).")
@db_option
def exclude(conversation_id: str, seq: int, include: bool, db_url: str | None) -> None:
    """Leave turn SEQ out of every request (it stays stored), e.g. one the API rejects.

    \b
    Example:
      convo exclude conv_01JD0000000000000000000000 7
      convo exclude conv_01JD0000000000000000000000 7 --include
    """
    with _store(db_url) as store:
        conv = store.get(conversation_id)
        if include:
            conv.include(seq)
        else:
            conv.exclude(seq)
    verb = "included again in" if include else "excluded from"
    click.echo(f"turn {seq} of {conversation_id} is {verb} requests")


@cli.group(cls=ConvoGroup)
def outbox() -> None:
    """Replies the API billed but the database could not take, kept in a local file.

    They are written on the next use of the store; these commands show and
    write them now.

    \b
    Example:
      convo outbox list
      convo outbox replay --db postgresql://app@db.internal/app
    """


@outbox.command("list")
@db_option
def outbox_list(db_url: str | None) -> None:
    """List the replies pending in this database's outbox.

    \b
    Example:
      convo outbox list
    """
    with _store(db_url, auto_replay=False) as store:
        pending = store.pending_replies()
        path = store.records.outbox.path
    for entry in pending:
        text = "".join(
            b.get("text", "") for b in entry.turn.get("content", []) if isinstance(b, dict)
        )
        click.echo(
            f"{entry.conversation_id} reply to turn {entry.user_seq}  {entry.created_at}  "
            f"{text[:60]!r}"
        )
    click.echo(f"{len(pending)} pending in {path}", err=True)


@outbox.command("replay")
@db_option
def outbox_replay(db_url: str | None) -> None:
    """Write the replies pending in the outbox into their conversations (never twice).

    \b
    Example:
      convo outbox replay
    """
    with _store(db_url, auto_replay=False) as store:
        written = store.replay_outbox()
        left = len(store.pending_replies())
    click.echo(f"wrote {written} pending replies; {left} left")


@cli.command()
@click.argument("query")
@click.option("--conversation", "conversation_id", metavar="ID", help="Only this conversation.")
@click.option(
    "--role", type=click.Choice(["user", "assistant"]), help="Only the user's or Claude's turns."
)
@date_option("--since", "Only turns written from this date (UTC) on.")
@date_option("--until", "Only turns written before this date (UTC).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def search(
    query: str,
    conversation_id: str | None,
    role: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
    db_url: str | None,
) -> None:
    """Find turns matching every term of QUERY, archived ones included, newest first.

    A term is a word, a prefix (refund*) or a "quoted phrase". Uses the
    database's own full-text index (SQLite FTS5, PostgreSQL tsvector, MySQL
    FULLTEXT).

    \b
    Example:
      convo search "refund policy"
      convo search '"refund policy" invoic*' --role assistant --since 2026-11-01
      convo search invoice --conversation conv_01JD0000000000000000000000
    """
    with _store(db_url) as store:
        hits = store.search(
            query,
            conversation_id=_conversation(store, conversation_id).id if conversation_id else None,
            limit=limit,
            role=role,
            since=_parse_since(since),
            until=_parse_since(until),
        )
    _print_hits(hits, as_json)


@cli.command()
@click.argument("query")
@click.option("--user", "user_id", metavar="ID", help="Only this user's conversations.")
@click.option("--conversation", "conversation_id", metavar="ID", help="Only this conversation.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
def recall(
    query: str,
    user_id: str | None,
    conversation_id: str | None,
    k: int,
    as_json: bool,
    db_url: str | None,
) -> None:
    """The K turns most relevant to QUERY, archived ones included, best first.

    Any word may match, by its stem ("trams" finds "tram"); stop words are
    ignored. Ranked by the database (SQLite FTS5 bm25, PostgreSQL
    ts_rank_cd, MySQL natural-language relevance); the score is on that
    engine's own scale.

    \b
    Example:
      convo recall "which tram goes to the monastery"
      convo recall "refund rules" --user alice -k 5 --json
    """
    with _store(db_url) as store:
        conversation = _conversation(store, conversation_id).id if conversation_id else None
        hits = store.recall(query, user_id=user_id, conversation_id=conversation, k=k)
    _print_hits(hits, as_json)


def _hit_json(hit: SearchHit | RecallHit) -> dict[str, Any]:
    from ._recall import RecallHit

    record: dict[str, Any] = {
        "conversation_id": hit.conversation_id,
        "seq": hit.seq,
        "role": hit.role,
        "created_at": hit.created_at.isoformat(),
    }
    if isinstance(hit, RecallHit):
        record["score"] = round(hit.score, 6)
    record["snippet"] = hit.snippet
    return record


def _hit_line(hit: SearchHit | RecallHit) -> str:
    from ._recall import RecallHit

    score = f" {hit.score:.3g}" if isinstance(hit, RecallHit) else ""
    when = f"{hit.created_at:%Y-%m-%d %H:%M}"
    return f"{hit.conversation_id} #{hit.seq} {hit.role} {when}{score}  {hit.snippet}"


def _print_hits(hits: Sequence[SearchHit | RecallHit], as_json: bool) -> None:
    if as_json:
        _emit_json([_hit_json(h) for h in hits])
        return
    for hit in hits:
        click.echo(_hit_line(hit))
    if not hits:
        click.echo("no matches", err=True)


@cli.command()
@click.argument("conversation_id", metavar="[ID]", required=False)
@continue_option
@click.option("--model", help="Model (a new conversation's, or from now on in this one).")
@click.option("--system", help="System prompt (a new conversation's, or from now on).")
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
    continue_latest: bool,
    model: str | None,
    system: str | None,
    budget: int | None,
    max_tokens: int,
    db_url: str | None,
) -> None:
    """Chat interactively, streaming replies; continue conversation ID (or -c the latest).

    Needs ANTHROPIC_API_KEY. Up-arrow recalls earlier inputs; a line ending
    in \\ continues, and \"\"\" on its own line starts and ends a multi-line
    block (a pasted block is one message). In the chat: /model, /system,
    /title, /context, /compact, /regenerate, /stats, /help, /exit. Ctrl-C
    during a reply stops it (the partial text is kept).

    \b
    Example:
      convo chat --system "You are a patient tutor."
      convo chat -c
      convo chat 01JD8X
    """
    with _store(db_url) as store:
        store.client  # noqa: B018 - says which key to set before anything starts
        if conversation_id or continue_latest:
            conv = _conversation(store, conversation_id, continue_latest)
            _apply(conv, model, system)
            click.echo(f"Continuing {_repl.describe(conv)}. /help for commands.")
            for message in _repl.recent_turns(conv):
                click.echo(_repl.render_turn(message, _turn_text(message)))
        else:
            conv = store.create(model=model, system=system, token_budget=budget)
            click.echo(f"New conversation {conv.id}. /help for commands.")
        _chat_loop(conv, max_tokens)
        click.echo(f"Bye. Continue with: convo chat {conv.id}")


def _chat_loop(conv: Conversation, max_tokens: int) -> None:
    reader = _repl.LineReader(interactive=sys.stdin.isatty())
    prompt = reader.prompt("you> ", fg="green", bold=True)
    more = reader.prompt("...> ", fg="green")
    while True:
        reader.begin()
        try:
            text = _repl.read_message(reader, prompt, more)
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        reader.remember(text)
        command = text.strip()
        if not command:
            continue
        if command.startswith("/"):
            if not _chat_command(conv, command, max_tokens):
                return
            continue
        _chat_turn(conv, functools.partial(conv.stream, text, max_tokens=max_tokens))


def _chat_command(conv: Conversation, command: str, max_tokens: int) -> bool:
    """Run an in-chat command; False to leave the chat."""
    name, _, argument = command.partition(" ")
    argument = argument.strip()
    if name in ("/exit", "/quit"):
        return False
    try:
        if name == "/id":
            click.echo(conv.id)
        elif name in ("/model", "/system", "/title"):
            _chat_setting(conv, name[1:], argument)
        elif name == "/context":
            _show_context(conv, as_json=False)
        elif name == "/compact":
            done = conv.compact()
            click.echo(
                "Nothing to compact."
                if done is None
                else f"Archived turns {done.first_seq}-{done.last_seq} and summarized them."
            )
        elif name == "/regenerate":
            _chat_turn(conv, functools.partial(conv.regenerate_stream, max_tokens=max_tokens))
        elif name == "/stats":
            total = conv.store.usage(conversation_id=conv.id).total
            click.echo(
                f"{plural(total.requests, 'request')}, "
                f"{plural(total.total_input_tokens, 'input token')} "
                f"({_format_ratio(total.cache_hit_ratio)} from cache), "
                f"{plural(total.output_tokens, 'output token')}, "
                f"cost {_format_cost(total.cost_usd)}"
            )
        elif name in ("/help", "/?"):
            click.echo(_repl.HELP)
        else:
            click.echo(f"Unknown command {name}; /help lists the commands.", err=True)
    except ConvoError as exc:
        click.echo(f"Error: {exc}", err=True)
    return True


def _chat_setting(conv: Conversation, name: str, value: str) -> None:
    """/model, /system, /title: show the setting, or change it (``-`` clears it)."""
    if value:
        changes: dict[str, Any] = {name: None if value == "-" else value}
        conv.update(**changes)
        click.echo(f"{name} set." if value != "-" else f"{name} cleared.")
        return
    current = {"model": conv.effective_model, "system": conv.system, "title": conv.title}[name]
    click.echo(current if current else f"(no {name})")


def _chat_turn(conv: Conversation, start: Callable[[], ConversationStream]) -> None:
    click.echo(_repl.styled("claude> ", fg="blue", bold=True), nl=False)
    try:
        with start() as reply:
            for delta in reply:
                click.echo(delta, nl=False)
        click.echo()
    except KeyboardInterrupt as exc:
        click.echo(_repl.styled(" [stopped; the text so far is kept]", dim=True))
        if isinstance(exc, Terminated):
            raise
    except ConvoError as exc:
        click.echo()
        click.echo(f"Error: {exc}", err=True)


def main() -> None:
    """Entry point of the ``convo`` console script."""
    handle_termination()
    cli(prog_name="convo")


if __name__ == "__main__":  # pragma: no cover
    main()
