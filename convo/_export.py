"""History export and import.

Export reads through archive blocks, so it is always the whole history, and
it streams: one conversation's turns at a time, in batches, written as they
are read (constant memory whatever the size). Formats:

``jsonl``
    One JSON record per line: a ``conversation`` record, then one ``message``
    record per turn (each naming its conversation). Importable.
``json``
    One JSON array with one document per conversation, its turns inside.
    Importable.
``markdown``
    A readable transcript.
``anthropic``
    Per conversation, one line of JSON with ``model``, ``system`` and
    ``messages`` exactly as the Messages API takes them.

Import takes ``jsonl`` or ``json`` as exported. It writes everything in one
transaction: a bad record (named by its line) leaves the database as it was.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any, Final, Literal

from ._content import normalize_content
from ._ids import is_conversation_id, new_conversation_id
from ._message import Message
from ._models import ConversationRow, MessageRow, SearchTextRow
from ._search import searchable_text
from ._summarizer import SummaryTurn, transcript
from ._window import LiveTurn, render_messages, system_blocks
from .errors import InvalidInput

if TYPE_CHECKING:
    from ._conversation import Conversation
    from ._store import ConversationStore

Format = Literal["jsonl", "json", "markdown", "anthropic"]
FORMATS: Final = ("jsonl", "json", "markdown", "anthropic")
OnConflict = Literal["error", "skip", "new-id"]
ON_CONFLICT: Final = ("error", "skip", "new-id")
FORMAT_VERSION: Final = 1


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


def export_history(
    store: ConversationStore,
    out: IO[str],
    *,
    conversation_ids: Iterable[str] | None = None,
    user_id: str | None = None,
    since: datetime | None = None,
    format: Format = "jsonl",
    on_message: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Write conversations to ``out``; returns (conversations, messages) written.

    ``conversation_ids`` picks conversations (an unknown id is an error,
    before anything is written); otherwise every conversation, optionally one
    user's and/or those active since ``since``. ``on_message`` is called per
    turn written (for a progress bar).
    """
    if format not in FORMATS:
        raise InvalidInput("format", f"must be one of {', '.join(FORMATS)}, not {format!r}")
    if conversation_ids is not None:
        chosen = [store.get(cid) for cid in conversation_ids]  # ConversationNotFound first
        conversations: Iterable[Conversation] = chosen
    else:
        conversations = store.iter_conversations(user_id=user_id, since=since)
    write = out.write
    total_conversations = total_messages = 0

    def messages_of(conv: Conversation) -> Iterator[Message]:
        nonlocal total_messages
        for message in conv.iter_history():
            total_messages += 1
            if on_message is not None:
                on_message()
            yield message

    if format == "json":
        write("[")
    for conv in conversations:
        if format == "jsonl":
            write(_dumps(conversation_record(conv)) + "\n")
            for message in messages_of(conv):
                write(_dumps(message_record(message)) + "\n")
        elif format == "json":
            document = conversation_record(conv)
            del document["record"]
            head = _dumps(document)[:-1]
            write(("," if total_conversations else "") + "\n" + head + ',"messages":[')
            for index, message in enumerate(messages_of(conv)):
                record = message_record(message)
                del record["record"], record["conversation_id"]
                write(("," if index else "") + "\n" + _dumps(record))
            write("]}")
        elif format == "markdown":
            if total_conversations:
                write("\n---\n\n")
            _markdown(conv, messages_of(conv), write)
        else:
            turns = [
                LiveTurn(m.seq, m.role, m.content, m.token_count, m.status, m.model)
                for m in messages_of(conv)
            ]
            request: dict[str, Any] = {"model": conv.effective_model}
            if conv.system:
                request["system"] = conv.system
            request["messages"] = render_messages(turns, model=conv.effective_model)
            write(_dumps(request) + "\n")
        total_conversations += 1
    if format == "json":
        write("\n]\n")
    return total_conversations, total_messages


# -- import ------------------------------------------------------------------------


@dataclass
class _ImportedConversation:
    record: dict[str, Any]
    line: int
    messages: list[dict[str, Any]]


def _fail(line: int, problem: str) -> InvalidInput:
    return InvalidInput(f"line {line}", problem)


def _parse_time(value: Any, line: int, field: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise _fail(line, f"{field} is not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise _fail(line, f"{field} has no time zone: {value!r}")
    return parsed


def _read_jsonl(source: IO[str]) -> Iterator[_ImportedConversation]:
    current: _ImportedConversation | None = None
    for number, raw in enumerate(source, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _fail(number, f"is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise _fail(number, "is not a JSON object")
        kind = record.get("record")
        if kind == "conversation":
            if current is not None:
                yield current
            current = _ImportedConversation(record, number, [])
        elif kind == "message":
            if current is None or record.get("conversation_id") != current.record.get("id"):
                raise _fail(number, "a message record must follow its conversation record")
            record["_line"] = number
            current.messages.append(record)
        else:
            raise _fail(number, f"unknown record type {kind!r} (expected conversation or message)")
    if current is not None:
        yield current


def _read_json(source: IO[str]) -> Iterator[_ImportedConversation]:
    text = source.read()
    try:
        documents = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(exc.lineno, f"is not valid JSON ({exc.msg})") from None
    if not isinstance(documents, list):
        raise _fail(1, "a json export is an array of conversations")
    for index, document in enumerate(documents):
        where = f"conversation {index + 1}"
        if not isinstance(document, dict) or not isinstance(document.get("messages"), list):
            raise InvalidInput(where, "must be an object with a messages list")
        messages = []
        for position, message in enumerate(document["messages"]):
            if not isinstance(message, dict):
                raise InvalidInput(f"{where}, message {position + 1}", "must be an object")
            messages.append({**message, "conversation_id": document.get("id"), "_line": 0})
        record = {k: v for k, v in document.items() if k != "messages"}
        yield _ImportedConversation(record, 0, messages)


def _message_row(
    store: ConversationStore, conversation_id: str, record: dict[str, Any], expected_seq: int
) -> MessageRow:
    line = record.get("_line", 0)

    def field_error(field: str, problem: str) -> InvalidInput:
        return _fail(line, f"{field} {problem}") if line else InvalidInput(field, problem)

    if record.get("seq") != expected_seq:
        raise field_error("seq", f"must be {expected_seq} (turns are numbered without gaps)")
    role = record.get("role")
    if role not in ("user", "assistant"):
        raise field_error("role", f"must be 'user' or 'assistant', not {role!r}")
    content = record.get("content")
    try:
        blocks = [] if role == "assistant" and content == [] else normalize_content(content)
    except InvalidInput as exc:
        raise field_error(exc.field, exc.problem) from None
    status = record.get("status", "complete")
    if status not in ("complete", "incomplete", "failed"):
        raise field_error("status", f"is not a known status: {status!r}")
    token_count = record.get("token_count")
    if not isinstance(token_count, int) or token_count < 0:
        token_count = store.count(blocks)
    return MessageRow(
        conversation_id=conversation_id,
        seq=expected_seq,
        role=role,
        content=blocks,
        token_count=token_count,
        status=status,
        model=record.get("model"),
        stop_reason=record.get("stop_reason"),
        usage=record.get("usage"),
        request_id=record.get("request_id"),
        latency_ms=record.get("latency_ms"),
        created_at=_parse_time(record.get("created_at"), line, "created_at"),
    )


def import_history(
    store: ConversationStore, source: IO[str], *, on_conflict: OnConflict = "error"
) -> tuple[int, int, int]:
    """Import a ``jsonl`` or ``json`` export; returns (imported, skipped, messages).

    An id that already exists is an error unless ``on_conflict`` is ``"skip"``
    or ``"new-id"``. All or nothing: any bad record raises
    :class:`InvalidInput` naming its line, and nothing is written.
    """
    from ._store import _check_metadata, _check_positive, _check_system, _check_text

    if on_conflict not in ON_CONFLICT:
        raise InvalidInput("on_conflict", f"must be one of {', '.join(ON_CONFLICT)}")
    first = source.read(1)
    while first and first.isspace():
        first = source.read(1)
    source.seek(0)
    reader = _read_json if first == "[" else _read_jsonl
    imported = skipped = messages = 0
    with store.database.transaction(write=True) as session:
        for item in reader(source):
            record, line = item.record, item.line
            where = f"line {line}" if line else "conversation"
            conversation_id = str(record.get("id"))
            if not is_conversation_id(conversation_id):
                raise InvalidInput(where, f"has no valid conversation id: {conversation_id!r}")
            if session.get(ConversationRow, conversation_id) is not None:
                if on_conflict == "skip":
                    skipped += 1
                    continue
                if on_conflict == "error":
                    raise InvalidInput(
                        where,
                        f"conversation {conversation_id} already exists "
                        "(use --on-conflict skip or new-id)",
                    )
                conversation_id = new_conversation_id()
            try:
                row = ConversationRow(
                    id=conversation_id,
                    user_id=_check_text("user_id", record.get("user_id"), 255),
                    title=_check_text("title", record.get("title"), 500),
                    model=_check_text("model", record.get("model"), 100),
                    system=_check_system(record.get("system")),
                    token_budget=_check_positive("token_budget", record.get("token_budget")),
                    metadata_=_check_metadata(record.get("metadata")),
                    last_seq=len(item.messages),
                    archived_through_seq=0,
                    created_at=_parse_time(record.get("created_at"), line, "created_at"),
                    updated_at=_parse_time(record.get("updated_at"), line, "updated_at"),
                )
            except InvalidInput as exc:
                raise InvalidInput(where, f"{exc.field} {exc.problem}") from None
            session.add(row)
            session.flush()
            for seq, message in enumerate(item.messages, start=1):
                message_row = _message_row(store, conversation_id, message, seq)
                session.add(message_row)
                searchable = searchable_text(message_row.content or [])
                if searchable:
                    session.add(
                        SearchTextRow(conversation_id=conversation_id, seq=seq, text=searchable)
                    )
                if seq % 1_000 == 0:
                    session.flush()
            session.flush()
            imported += 1
            messages += len(item.messages)
    return imported, skipped, messages
