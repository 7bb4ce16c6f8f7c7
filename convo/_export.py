"""History export and import.

Export reads through archive blocks, so it is always the whole history, and
it streams: one conversation's turns at a time, in batches, written as they
are read (constant memory whatever the size). Formats:

``jsonl``
    One JSON record per line: a ``conversation`` record, one ``message``
    record per turn, then the conversation's ``archive`` blocks and
    ``summary`` rows as stored (so a compacted conversation imports
    compacted), each naming its conversation. The file ends with an ``end``
    record holding the counts, which import checks: a truncated file is
    refused. Importable.
``json``
    One JSON array: one document per conversation (its turns, archive blocks
    and summaries inside), then the ``end`` record. Importable.
``markdown``
    A readable transcript.
``anthropic``
    Per conversation, one line of JSON with ``model``, ``system`` and
    ``messages`` exactly as the Messages API takes them.

Import takes ``jsonl`` or ``json`` as exported (format 2, and format 1 of
earlier versions), plain or gzip-compressed, with or without a UTF-8 BOM. It
also takes other tools' histories: the Messages API's ``messages`` (a JSON
list of MessageParams, or a request body with ``model``/``system``/
``messages``, or this module's ``anthropic`` lines) and the output of
simonw/llm's ``llm logs --json``. Every turn gets the checks ``add`` makes.
It writes everything in one transaction (``Records.importing``): a bad record
(named by its line) leaves the database as it was.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Final, Literal, NamedTuple, get_args

from . import _archive
from ._content import Block, normalize_content
from ._ids import PREFIX, is_conversation_id, new_conversation_id
from ._message import Message, Status
from ._models import (
    ArchiveBlockRow,
    ConversationRow,
    MessageRow,
    SummaryRow,
    utcnow,
)
from ._summarizer import SummaryTurn, transcript
from ._turns import Turn, check_metadata, check_text
from ._window import LiveTurn, SummaryPart, render_messages, summary_block, system_blocks
from .errors import ConversationNotFound, ConvoError, ExportFailed, InvalidInput

if TYPE_CHECKING:
    from ._conversation import Conversation
    from ._records import ImportWriter
    from ._store import ConversationStore

Format = Literal["jsonl", "json", "markdown", "anthropic"]
FORMATS: Final = ("jsonl", "json", "markdown", "anthropic")
OnConflict = Literal["error", "skip", "new-id"]
ON_CONFLICT: Final = ("error", "skip", "new-id")
#: 2 carries archive blocks, summaries and the end record; 1 had turns only.
FORMAT_VERSION: Final = 2
READABLE_FORMATS: Final = (1, 2)
#: A conversation being exported with ``skip_bad`` is held in memory up to
#: this size, then in a temporary file.
SPOOL_BYTES: Final = 8 * 2**20
_STATUSES: Final = get_args(Status)
_MAX_INT: Final = 2**31 - 1
_EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST: Final = datetime(9999, 12, 31, tzinfo=UTC)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def conversation_record(conv: Conversation) -> dict[str, Any]:
    return {
        "record": "conversation",
        "format": FORMAT_VERSION,
        "id": conv.id,
        "user_id": conv.user_id,
        "title": conv.title,
        "model": conv.model,
        "system": conv.system,
        "token_budget": conv.token_budget,
        "metadata": conv.metadata,
        "archived_through_seq": conv.archived_through_seq,
        "window_start_seq": conv.window_start_seq,
        "compaction_failures": conv.compaction_failures,
        "compaction_retry_at": (
            conv.compaction_retry_at.isoformat() if conv.compaction_retry_at else None
        ),
        "created_at": conv.created_at.isoformat(),
        "updated_at": conv.updated_at.isoformat(),
    }


def message_record(message: Message) -> dict[str, Any]:
    return {
        "record": "message",
        "conversation_id": message.conversation_id,
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
        "latency_ms": message.latency_ms,
    }


def archive_record(block: ArchiveBlockRow) -> dict[str, Any]:
    return {
        "record": "archive",
        "conversation_id": block.conversation_id,
        "first_seq": block.first_seq,
        "last_seq": block.last_seq,
        "payload": block.payload,
        "checksum": block.checksum,
        "raw_bytes": block.raw_bytes,
        "created_at": block.created_at.isoformat(),
    }


def summary_record(summary: SummaryRow) -> dict[str, Any]:
    return {
        "record": "summary",
        "conversation_id": summary.conversation_id,
        "through_seq": summary.through_seq,
        "text": summary.text,
        "token_count": summary.token_count,
        "summarizer": summary.summarizer,
        "model": summary.model,
        "usage": summary.usage,
        "created_at": summary.created_at.isoformat(),
    }


def _markdown(conv: Conversation, messages: Iterable[Message], write: Callable[[str], Any]) -> int:
    started = f"{conv.created_at:%Y-%m-%d %H:%M} UTC"
    write(f"# {conv.title or 'Conversation'}\n\n`{conv.id}` · started {started}\n")
    if conv.system:
        system = "\n".join(b.get("text", "") for b in system_blocks(conv.system))
        write("\n> **System:** " + system.replace("\n", "\n> ") + "\n")
    count = 0
    for message in messages:
        count += 1
        status = "" if message.status == "complete" else f" _({message.status})_"
        when = f"{message.created_at:%Y-%m-%d %H:%M}"
        write(f"\n## {message.role.capitalize()} · turn {message.seq} · {when}{status}\n\n")
        body = (
            message.text
            if message.content and all(b.get("type") == "text" for b in message.content)
            else transcript([SummaryTurn(message.seq, message.role, message.content)]).split(
                ": ", 1
            )[-1]
        )
        write(body + "\n")
    return count


class ExportSummary(NamedTuple):
    """What an export wrote, and the conversations it skipped (id, problem)."""

    conversations: int
    messages: int
    skipped: list[tuple[str, str]]


def export_history(
    store: ConversationStore,
    out: IO[str],
    *,
    conversation_ids: Iterable[str] | None = None,
    user_id: str | None = None,
    since: datetime | None = None,
    format: Format = "jsonl",
    skip_bad: bool = False,
    on_message: Callable[[], None] | None = None,
) -> ExportSummary:
    """Write conversations to ``out``; returns what was written.

    ``conversation_ids`` picks conversations (an unknown id is an error,
    before anything is written); otherwise every conversation, optionally one
    user's and/or those active since ``since``. ``on_message`` is called per
    turn written (for a progress bar).

    A conversation that cannot be read (a corrupted archive block,
    undecodable text) raises :class:`ExportFailed`, and the output has no
    ``end`` record, so import refuses it. With ``skip_bad`` it is left out
    whole and listed in the result's ``skipped`` (and in the ``end`` record).
    """
    if format not in FORMATS:
        raise InvalidInput("format", f"must be one of {', '.join(FORMATS)}, not {format!r}")
    if conversation_ids is not None:
        chosen = [store.get(cid) for cid in conversation_ids]  # ConversationNotFound first
        conversations: Iterable[Conversation] = chosen
    else:
        conversations = store.iter_conversations(user_id=user_id, since=since)
    written = messages = 0
    skipped: list[tuple[str, str]] = []
    if format == "json":
        out.write("[")
    for conv in conversations:
        separator = "," if format == "json" and written else ""
        if format == "markdown" and written:
            separator = "\n---\n\n"
        try:
            if skip_bad:
                # Held aside until the conversation is whole, so a bad one leaves nothing.
                with tempfile.SpooledTemporaryFile(
                    SPOOL_BYTES, "w+", encoding="utf-8", newline=""
                ) as spool:
                    spool.write(separator)
                    count = _export_one(store, conv, format, spool.write, on_message)
                    spool.seek(0)
                    shutil.copyfileobj(spool, out)
            else:
                out.write(separator)
                count = _export_one(store, conv, format, out.write, on_message)
        except ConversationNotFound:
            continue  # deleted meanwhile
        except (ConvoError, ValueError) as exc:
            if not skip_bad:
                hint = "; use --skip-bad (skip_bad=True) to export the others"
                raise ExportFailed(conv.id, f"{exc}{hint}") from exc
            skipped.append((conv.id, str(exc)))
            continue
        written += 1
        messages += count
    if format in ("jsonl", "json"):
        end: dict[str, Any] = {
            "record": "end",
            "format": FORMAT_VERSION,
            "conversations": written,
            "messages": messages,
        }
        if skipped:
            end["skipped"] = [{"id": cid, "problem": problem} for cid, problem in skipped]
        if format == "jsonl":
            out.write(_dumps(end) + "\n")
        else:
            out.write(("," if written else "") + "\n" + _dumps(end) + "\n]\n")
    return ExportSummary(written, messages, skipped)


def _export_one(
    store: ConversationStore,
    conv: Conversation,
    format: str,
    write: Callable[[str], Any],
    on_message: Callable[[], None] | None,
) -> int:
    """Write one conversation; returns its number of turns."""
    count = 0

    def messages_of() -> Iterator[Message]:
        nonlocal count
        for message in conv.iter_history():
            count += 1
            if on_message is not None:
                on_message()
            yield message

    if format == "jsonl":
        write(_dumps(conversation_record(conv)) + "\n")
        for message in messages_of():
            write(_dumps(message_record(message)) + "\n")
        for block in store.records.archive_blocks(conv.id):
            write(_dumps(archive_record(block)) + "\n")
        for summary in store.records.summaries(conv.id):
            write(_dumps(summary_record(summary)) + "\n")
    elif format == "json":
        document = conversation_record(conv)
        del document["record"]
        write("\n" + _dumps(document)[:-1] + ',"messages":[')
        _json_items(write, map(message_record, messages_of()))
        write('],"archive":[')
        _json_items(write, map(archive_record, store.records.archive_blocks(conv.id)))
        write('],"summaries":[')
        _json_items(write, map(summary_record, store.records.summaries(conv.id)))
        write("]}")
    elif format == "markdown":
        _markdown(conv, messages_of(), write)
    else:
        turns = [
            LiveTurn(m.seq, m.role, m.content, m.token_count, m.status, m.model)
            for m in messages_of()
        ]
        request: dict[str, Any] = {"model": conv.effective_model}
        if conv.system:
            request["system"] = conv.system
        request["messages"] = render_messages(turns, model=conv.effective_model)
        write(_dumps(request) + "\n")
    return count


def _json_items(write: Callable[[str], Any], records: Iterable[dict[str, Any]]) -> None:
    for index, record in enumerate(records):
        del record["record"], record["conversation_id"]
        write(("," if index else "") + "\n" + _dumps(record))


# -- import: reading ------------------------------------------------------------------


@dataclass
class _ImportedConversation:
    record: dict[str, Any]
    where: str
    messages: list[dict[str, Any]]
    archive: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    #: An id taken from another tool: a new one is made if it is not convo's shape.
    foreign: bool = False


def _fail(line: int, problem: str) -> InvalidInput:
    return InvalidInput(f"line {line}" if line else "file", problem)


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse(text: str, line: int) -> Any:
    """JSON text (starting at ``line``) parsed, or :class:`InvalidInput` saying why not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(line - 1 + exc.lineno, f"is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise _fail(line, "is nested too deeply") from None
    if _SURROGATE.search(text) is not None:
        try:
            _dumps(value).encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(
                line, "contains a lone surrogate (such as \\ud800), which is not text"
            ) from None
        except RecursionError:
            raise _fail(line, "is nested too deeply") from None
    return value


def _text_lines(source: IO[str] | IO[bytes]) -> Iterator[str]:
    """The lines of ``source``: gzip undone, a UTF-8 BOM dropped, UTF-8 checked."""
    wrapper: io.TextIOWrapper | None = None
    unzipped: gzip.GzipFile | None = None
    if isinstance(source, io.TextIOBase) or "b" not in getattr(source, "mode", "b"):
        text: Iterable[str] = source  # type: ignore[assignment]
    else:
        binary: Any = source if hasattr(source, "peek") else io.BufferedReader(source)
        if binary.peek(2)[:2] == b"\x1f\x8b":
            binary = unzipped = gzip.GzipFile(fileobj=binary, mode="rb")
        text = wrapper = io.TextIOWrapper(binary, encoding="utf-8", newline=None)
    number = 0
    try:
        for number, line in enumerate(text, start=1):
            if number == 1:
                line = line.removeprefix("\ufeff")
            if "\x00" in line:
                raise _fail(number, "holds NUL bytes: this is a binary file, not an export")
            yield line
    except UnicodeDecodeError:
        raise InvalidInput(
            "file", f"is not UTF-8 text (near line {number + 1}); is it an export?"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InvalidInput(
            "file", f"is a gzip file that cannot be read (near line {number + 1}: {exc})"
        ) from None
    finally:
        if wrapper is not None:
            wrapper.detach()  # the caller's file stays open, and theirs to close
        if unzipped is not None:
            unzipped.close()


def _records(source: IO[str] | IO[bytes]) -> Iterator[_ImportedConversation]:
    """Conversations from any format import takes, sniffed from the first record."""
    lines = _text_lines(source)
    number = 0
    first = ""
    for number, first in enumerate(lines, start=1):  # noqa: B007 - used after the loop
        if first.strip():
            break
    else:
        raise InvalidInput("file", "is empty: there is nothing to import")
    record: Any = None
    if not first.lstrip().startswith("["):
        try:
            record = json.loads(first)  # only to see what it is; _parse checks it after
        except (ValueError, RecursionError):
            record = None  # a document over several lines, or not JSON: read it whole
    if isinstance(record, dict) and "record" in record:
        yield from _read_jsonl(first, number, lines)
    elif isinstance(record, dict) and "messages" in record and "prompt" not in record:
        yield from _read_requests(first, number, lines)
    elif isinstance(record, dict) and ("prompt" in record or "response" in record):
        yield from _read_llm_logs([_loaded(line, n) for n, line in _numbered(first, number, lines)])
    else:
        yield from _read_document(_parse(first + "".join(lines), number))


def _numbered(first: str, number: int, lines: Iterator[str]) -> Iterator[tuple[int, str]]:
    yield number, first
    for offset, line in enumerate(lines, start=number + 1):
        if line.strip():
            yield offset, line


def _loaded(line: str, number: int) -> dict[str, Any]:
    record = _parse(line, number)
    if not isinstance(record, dict):
        raise _fail(number, "is not a JSON object")
    return record


def _check_format(record: dict[str, Any], line: int) -> int:
    version = record.get("format")
    if version not in READABLE_FORMATS:
        if isinstance(version, int) and not isinstance(version, bool) and version > 0:
            raise _fail(
                line,
                f"export format {version} is newer than this convo reads "
                f"(up to {FORMAT_VERSION}); upgrade convo",
            )
        raise _fail(line, f"has no known export format version: {version!r}")
    return int(version)


def _check_end(
    end: dict[str, Any] | None, version: int | None, conversations: int, messages: int, line: int
) -> None:
    if end is not None:
        _check_format(end, line)
    elif version == 1:
        return  # format 1 had no end record
    if end is None:
        raise _fail(
            line,
            "the file ends without its end record: it is truncated or not a whole export",
        )
    if end.get("conversations") != conversations or end.get("messages") != messages:
        raise _fail(
            line,
            f"the end record counts {end.get('conversations')!r} conversations and "
            f"{end.get('messages')!r} messages, the file holds {conversations} and {messages}",
        )


def _read_jsonl(first: str, number: int, lines: Iterator[str]) -> Iterator[_ImportedConversation]:
    current: _ImportedConversation | None = None
    version: int | None = None
    end: dict[str, Any] | None = None
    conversations = messages = 0
    last = number
    for last, raw in _numbered(first, number, lines):
        record = _loaded(raw, last)
        if end is not None:
            raise _fail(last, "a record after the end record")
        kind = record.get("record")
        if kind == "conversation":
            this = _check_format(record, last)
            if version is not None and this != version:
                raise _fail(last, f"format {this} after format {version} records")
            version = this
            if current is not None:
                yield current
            current = _ImportedConversation(record, f"line {last}", [])
            conversations += 1
            continue
        if kind == "end":
            end = record
            continue
        if kind not in ("message", "archive", "summary") or (kind != "message" and version == 1):
            raise _fail(
                last,
                f"unknown record type {kind!r} (expected conversation, message, archive, "
                "summary or end)",
            )
        if "conversation_id" not in record:
            raise _fail(last, f"the {kind} record has no conversation_id")
        if current is None or record["conversation_id"] != current.record.get("id"):
            raise _fail(
                last,
                f"the {kind} record names conversation {record['conversation_id']!r}; it must "
                "follow that conversation's record",
            )
        record["_line"] = last
        if kind == "message":
            current.messages.append(record)
            messages += 1
        elif kind == "archive":
            current.archive.append(record)
        else:
            current.summaries.append(record)
    if current is not None:
        yield current  # written in the import's transaction: a bad end still undoes it
    _check_end(end, version, conversations, messages, last + 1)


def _read_document(document: Any) -> Iterator[_ImportedConversation]:
    """A whole JSON document: a convo json export, MessageParams, a request, llm logs."""
    if isinstance(document, dict) and "messages" in document:
        yield _request_conversation(document, "file")
        return
    if not isinstance(document, list):
        raise InvalidInput("file", "is neither a convo export nor a list of messages")
    if not document:
        raise InvalidInput("file", "is an empty list: there is nothing to import")
    head = document[0]
    if isinstance(head, dict) and "role" in head:
        yield _request_conversation({"messages": document}, "file")
    elif isinstance(head, dict) and ("prompt" in head or "response" in head):
        yield from _read_llm_logs(document)
    elif isinstance(head, dict) and "messages" in head and "id" not in head:
        for index, request in enumerate(document):
            yield _request_conversation(request, f"request {index + 1}")
    else:
        yield from _read_json(document)


def _read_json(documents: list[Any]) -> Iterator[_ImportedConversation]:
    end = documents[-1] if isinstance(documents[-1], dict) else None
    if end is not None and end.get("record") == "end":
        documents = documents[:-1]
    else:
        end = None
    version: int | None = None
    total = 0
    for index, document in enumerate(documents):
        where = f"conversation {index + 1}"
        if not isinstance(document, dict) or not isinstance(document.get("messages"), list):
            raise InvalidInput(where, "must be an object with a messages list")
        try:
            this = _check_format(document, 0)
        except InvalidInput as exc:
            raise InvalidInput(where, exc.problem) from None
        if version is not None and this != version:
            raise InvalidInput(where, f"format {this} after format {version} documents")
        version = this
        parts: dict[str, list[dict[str, Any]]] = {}
        for key in ("messages", "archive", "summaries"):
            items = document.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise InvalidInput(f"{where}, {key}", "must be a list of objects")
            parts[key] = [
                {**item, "_where": f"{where}, {key} {n + 1}"} for n, item in enumerate(items)
            ]
        total += len(parts["messages"])
        record = {
            k: v for k, v in document.items() if k not in ("messages", "archive", "summaries")
        }
        yield _ImportedConversation(
            record, where, parts["messages"], parts["archive"], parts["summaries"]
        )
    try:
        _check_end(end, version, len(documents), total, 0)
    except InvalidInput as exc:
        raise InvalidInput("file", exc.problem) from None


def _read_requests(
    first: str, number: int, lines: Iterator[str]
) -> Iterator[_ImportedConversation]:
    """Lines of Messages API requests (this module's ``anthropic`` format)."""
    for line, raw in _numbered(first, number, lines):
        yield _request_conversation(_loaded(raw, line), f"line {line}")


def _request_conversation(request: Any, where: str) -> _ImportedConversation:
    """One conversation from a Messages API request body (``messages``, ``system``, ``model``)."""
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise InvalidInput(where, "must be an object with a messages list")
    messages = list(request["messages"])
    system = request.get("system")
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        if system is not None:
            raise InvalidInput(where, "has a system prompt twice")
        system = messages.pop(0).get("content")  # OpenAI-style: taken as the system prompt
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInput(f"{where}, message {index + 1}", "must be an object")
        unknown = set(message) - {"role", "content"}
        if unknown:
            raise InvalidInput(
                f"{where}, message {index + 1}",
                f"has {sorted(unknown)[0]!r}: a MessageParam has only role and content",
            )
        turns.append(
            {
                "role": message.get("role"),
                "content": message.get("content"),
                "_where": f"{where}, message {index + 1}",
            }
        )
    record = {"model": request.get("model"), "system": system}
    return _ImportedConversation(record, where, turns, foreign=True)


def _llm_time(value: Any) -> str | None:
    """llm's ``datetime_utc`` (naive, UTC) as an aware ISO time."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()


def _read_llm_logs(records: list[Any]) -> Iterator[_ImportedConversation]:
    """simonw/llm's ``llm logs --json``: one record per prompt and response.

    Records are grouped by ``conversation_id`` and ordered by time; each gives
    a user turn (``prompt``) and an assistant turn (``response``, with its
    token counts and duration). An exchange with no prompt or no response
    text is left out (it would break the turns' alternation).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise InvalidInput(f"record {index + 1}", "must be an object")
        key = record.get("conversation_id")
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"record {index + 1}", "has no conversation_id")
        groups.setdefault(key, []).append({**record, "_index": index + 1})
    for key, group in groups.items():
        group.sort(key=lambda r: (str(r.get("datetime_utc") or ""), str(r.get("id") or "")))
        head = group[0]
        turns: list[dict[str, Any]] = []
        for record in group:
            prompt, response = record.get("prompt"), record.get("response")
            if not (isinstance(prompt, str) and prompt.strip()):
                continue
            if not (isinstance(response, str) and response.strip()):
                continue
            where = f"record {record['_index']}"
            when = _llm_time(record.get("datetime_utc"))
            usage = {
                k: record[k]
                for k in ("input_tokens", "output_tokens")
                if isinstance(record.get(k), int)
            }
            turns.append({"role": "user", "content": prompt, "created_at": when, "_where": where})
            turns.append(
                {
                    "role": "assistant",
                    "content": response,
                    "created_at": when,
                    "model": record.get("model"),
                    "usage": usage or None,
                    "latency_ms": record.get("duration_ms"),
                    "_where": where,
                }
            )
        candidate = PREFIX + key.upper()
        record_out = {
            "id": candidate if is_conversation_id(candidate) else None,
            "title": head.get("conversation_name"),
            "model": head.get("conversation_model") or head.get("model"),
            "system": head.get("system") or None,
            "metadata": {"imported_from": "llm", "llm_conversation_id": key},
            "created_at": _llm_time(head.get("datetime_utc")),
        }
        yield _ImportedConversation(record_out, f"record {head['_index']}", turns, foreign=True)


# -- import: checking and writing ------------------------------------------------------


def _where(record: dict[str, Any], default: str) -> str:
    line = record.get("_line")
    return f"line {line}" if line else str(record.get("_where", default))


def _parse_time(value: Any, where: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise InvalidInput(where, f"{name} is not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise InvalidInput(where, f"{name} has no time zone: {value!r}")
    try:
        in_utc = parsed.astimezone(UTC)
    except OverflowError:
        in_utc = _EARLIEST.replace(year=1)
    if not _EARLIEST <= in_utc <= _LATEST:
        raise InvalidInput(where, f"{name} is out of range (1970 to 9999): {value!r}")
    return in_utc


def _check_count(where: str, name: str, value: Any, *, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise InvalidInput(where, f"{name} must be a whole number from 0 to {_MAX_INT}")
    return value


def _check_usage(where: str, value: Any) -> dict[str, Any] | None:
    """``usage`` as the API reports it: an object whose token counts are whole numbers."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidInput(where, f"usage must be an object, not {type(value).__name__}")
    for key, count in value.items():
        if key.endswith("_tokens") and count is not None:
            _check_count(where, f"usage.{key}", count)
    try:
        return check_metadata(value)
    except InvalidInput as exc:
        raise InvalidInput(where, f"usage {exc.problem}") from None


class _Importer:
    """Checks one conversation's records like ``add`` checks a turn, then writes them."""

    def __init__(self, store: ConversationStore, writer: ImportWriter) -> None:
        self.store = store
        self.writer = writer

    def conversation_row(
        self, item: _ImportedConversation, conversation_id: str
    ) -> ConversationRow:
        record, where = item.record, item.where
        now = utcnow().isoformat()
        try:
            archived = _check_count(
                where, "archived_through_seq", record.get("archived_through_seq", 0) or 0
            )
            # The checks (and redact_storage) that create() applies.
            columns = self.store.turns.conversation_columns(
                {
                    name: record.get(name)
                    for name in ("user_id", "title", "model", "system", "token_budget", "metadata")
                }
            )
            # Compaction state (absent from exports before it existed: none then).
            window_start = _check_count(where, "window_start_seq", record.get("window_start_seq"))
            if window_start is not None and window_start > len(item.messages) + 1:
                raise InvalidInput(
                    where, f"window_start_seq {window_start} is past the turn after the last"
                )
            failures = _check_count(where, "compaction_failures", record.get("compaction_failures"))
            retry = record.get("compaction_retry_at")
            return ConversationRow(
                id=conversation_id,
                **columns,
                last_seq=len(item.messages),
                archived_through_seq=archived,
                window_start_seq=window_start or 0,
                compaction_failures=failures or 0,
                compaction_retry_at=(
                    None if retry is None else _parse_time(retry, where, "compaction_retry_at")
                ),
                created_at=_parse_time(record.get("created_at") or now, where, "created_at"),
                updated_at=_parse_time(
                    record.get("updated_at") or record.get("created_at") or now,
                    where,
                    "updated_at",
                ),
            )
        except InvalidInput as exc:
            if exc.field == where:
                raise
            raise InvalidInput(where, f"{exc.field} {exc.problem}") from None

    def message_row(
        self, conv: Conversation, record: dict[str, Any], seq: int, archived: bool
    ) -> tuple[MessageRow, list[Block]]:
        """The turn's row (content NULL if archived) and its content as stored."""
        where = _where(record, f"message {seq}")
        if "seq" in record and record["seq"] != seq:
            raise InvalidInput(where, f"seq must be {seq} (turns are numbered without gaps)")
        status = record.get("status", "complete")
        if status not in _STATUSES:
            raise InvalidInput(where, f"status is not a known status: {status!r}")
        try:
            content = record.get("content")
            role = record.get("role")
            if role == "assistant" and content == []:  # a reply cut before any text
                turn = Turn("assistant", [], self.store.turns.count([]))
            else:
                turn = self.store.turns.make_turn(role, content)
            conv._check_fits(turn)
            fields = {
                name: check_text(name, record.get(name), size)
                for name, size in (("model", 100), ("stop_reason", 64), ("request_id", 128))
            }
        except InvalidInput as exc:
            raise type(exc)(where, f"{exc.field} {exc.problem}") from None
        row = MessageRow(
            conversation_id=conv.id,
            seq=seq,
            role=turn.role,
            content=None if archived else turn.content,
            token_count=turn.token_count,
            status=status,
            usage=_check_usage(where, record.get("usage")),
            latency_ms=_check_count(where, "latency_ms", record.get("latency_ms")),
            created_at=_parse_time(
                record.get("created_at") or utcnow().isoformat(), where, "created_at"
            ),
            **fields,
        )
        return row, turn.content

    def archive_rows(
        self,
        item: _ImportedConversation,
        conversation_id: str,
        rows: list[MessageRow],
        contents: list[list[Block]],
        archived: int,
    ) -> list[ArchiveBlockRow]:
        """The blocks, checked: checksums, exact cover of turns 1..archived, same turns."""
        blocks: list[ArchiveBlockRow] = []
        expected_first = 1
        for record in sorted(item.archive, key=lambda r: r.get("first_seq") or 0):
            where = _where(record, "archive block")
            first = _check_count(where, "first_seq", record.get("first_seq"), optional=False)
            last = _check_count(where, "last_seq", record.get("last_seq"), optional=False)
            payload, checksum = record.get("payload"), record.get("checksum")
            if not isinstance(payload, str) or not isinstance(checksum, str):
                raise InvalidInput(where, "payload and checksum must be strings")
            if first != expected_first or last is None or last < first or last > archived:
                raise InvalidInput(
                    where,
                    f"blocks must cover turns 1-{archived} (archived_through_seq) exactly, "
                    f"without gaps or overlaps; this one holds {first}-{last}",
                )
            try:
                turns = _archive.unpack(item.where, first, last, payload, checksum)
            except ConvoError as exc:
                raise InvalidInput(where, str(exc)) from None
            stored = [
                _archive.ArchivedTurn(t.seq, rows[t.seq - 1].role, contents[t.seq - 1])
                for t in turns
            ]
            if turns != stored:
                # The block must hold the turns the message records hold, as they
                # are stored (redact_storage may have changed both alike).
                checked = [
                    _archive.ArchivedTurn(
                        t.seq, t.role, self.store.turns.for_storage(normalize_content(t.content))
                    )
                    for t in turns
                ]
                if checked != stored:
                    raise InvalidInput(where, "the block's turns differ from the message records")
                packed = _archive.pack(stored)
                payload, checksum = packed.payload, packed.checksum
            raw_bytes = len(_archive.encode(stored))
            blocks.append(
                ArchiveBlockRow(
                    conversation_id=conversation_id,
                    first_seq=first,
                    last_seq=last,
                    payload=payload,
                    checksum=checksum,
                    raw_bytes=raw_bytes,
                    created_at=_parse_time(record.get("created_at"), where, "created_at"),
                )
            )
            expected_first = last + 1
        if expected_first != archived + 1:
            raise InvalidInput(
                item.where,
                f"archived_through_seq is {archived} but the archive blocks cover turns "
                f"1-{expected_first - 1}",
            )
        return blocks

    def summary_rows(
        self, item: _ImportedConversation, conversation_id: str, archived: int
    ) -> list[SummaryRow]:
        summaries: list[SummaryRow] = []
        seen: set[int] = set()
        for record in item.summaries:
            where = _where(record, "summary")
            through = _check_count(where, "through_seq", record.get("through_seq"), optional=False)
            if through is None or not 0 < through <= archived or through in seen:
                raise InvalidInput(
                    where, f"through_seq must be a distinct turn from 1 to {archived}"
                )
            seen.add(through)
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput(where, "text must be a non-empty string")
            try:
                summarizer = check_text("summarizer", record.get("summarizer"), 32)
                model = check_text("model", record.get("model"), 100)
                text = check_text("text", text, 10**8) or ""
                if self.store.storage_redactor is not None:
                    text = self.store.storage_redactor.redact_text(text)
            except InvalidInput as exc:
                raise InvalidInput(where, f"{exc.field} {exc.problem}") from None
            summaries.append(
                SummaryRow(
                    conversation_id=conversation_id,
                    through_seq=through,
                    text=text,
                    token_count=self.store.turns.count_text(
                        summary_block(SummaryPart(text, through, 0))["text"]
                    ),
                    summarizer=summarizer or "custom",
                    model=model,
                    usage=_check_usage(where, record.get("usage")),
                    created_at=_parse_time(record.get("created_at"), where, "created_at"),
                )
            )
        if archived and archived not in seen:
            raise InvalidInput(
                item.where, f"turns 1-{archived} are archived but no summary covers them"
            )
        return summaries

    def write(self, item: _ImportedConversation, conversation_id: str) -> None:
        from ._conversation import Conversation

        row = self.conversation_row(item, conversation_id)
        archived = row.archived_through_seq
        if archived > len(item.messages):
            raise InvalidInput(item.where, f"archived_through_seq {archived} is past the last turn")
        conv = Conversation(self.store, row)
        rows, contents = [], []
        for seq, record in enumerate(item.messages, start=1):
            message, content = self.message_row(conv, record, seq, seq <= archived)
            rows.append(message)
            contents.append(content)
        blocks = self.archive_rows(item, conversation_id, rows, contents, archived)
        summaries = self.summary_rows(item, conversation_id, archived)
        self.writer.write(row, rows, contents, blocks, summaries)


def import_history(
    store: ConversationStore,
    source: IO[str] | IO[bytes],
    *,
    on_conflict: OnConflict = "error",
) -> tuple[int, int, int]:
    """Import an export (or another tool's history); returns (imported, skipped, messages).

    ``source`` is a text or binary file (binary may be gzip-compressed). An
    id that already exists is an error unless ``on_conflict`` is ``"skip"``
    or ``"new-id"``. All or nothing: any bad record raises
    :class:`InvalidInput` naming its line, and nothing is written.
    """
    if on_conflict not in ON_CONFLICT:
        raise InvalidInput("on_conflict", f"must be one of {', '.join(ON_CONFLICT)}")
    imported = skipped = messages = 0
    with store.records.importing() as writer:
        importer = _Importer(store, writer)
        for item in _records(source):
            conversation_id = item.record.get("id")
            if item.foreign and conversation_id is None:
                conversation_id = new_conversation_id()
            if not is_conversation_id(conversation_id):
                raise InvalidInput(item.where, f"has no valid conversation id: {conversation_id!r}")
            assert isinstance(conversation_id, str)
            if writer.exists(conversation_id):
                if on_conflict == "skip":
                    skipped += 1
                    continue
                if on_conflict == "error":
                    raise InvalidInput(
                        item.where,
                        f"conversation {conversation_id} already exists "
                        "(use --on-conflict skip or new-id)",
                    )
                conversation_id = new_conversation_id()
            importer.write(item, conversation_id)
            imported += 1
            messages += len(item.messages)
    return imported, skipped, messages
