"""Export and import: whole histories through archives, exact round trips, all-or-nothing."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from convo import (
    ConversationNotFound,
    ConversationStore,
    ExportFailed,
    ExtractiveSummarizer,
    InvalidInput,
    SummaryResult,
    _migrations,
)
from convo._database import Database, resolve_url
from convo._export import export_history, import_history
from convo._models import ArchiveBlockRow
from tests.conftest import reset_server_database


def _fill(store: ConversationStore) -> list[str]:
    ids = []
    first = store.create(
        title="Travel",
        user_id="ada",
        system="Be kind.",
        metadata={"k": [1, "ü"]},
        token_budget=9_000,
        model="claude-haiku-5-5",
    )
    for i in range(12):
        first.add("user" if i % 2 == 0 else "assistant", f"turn {i}: naïve café 🚀 " * (i + 1))
    first.add(
        "assistant", [{"type": "tool_use", "id": "t1", "name": "lookup", "input": {"z": 1, "a": 2}}]
    )
    first.add("user", [{"type": "tool_result", "tool_use_id": "t1", "content": "found"}])
    assert first.compact() is not None  # part of the history now lives in an archive block
    ids.append(first.id)
    second = store.create(user_id="bob")
    second.add("user", "just one turn")
    ids.append(second.id)
    ids.append(store.create(title="empty").id)
    return ids


def _export(store: ConversationStore, fmt: str = "jsonl", **kwargs: object) -> str:
    out = io.StringIO()
    export_history(store, out, format=fmt, **kwargs)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.fixture
def filled(migrated_url: str) -> tuple[str, list[str]]:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        return migrated_url, _fill(store)


def _empty_again(url: str, tmp_path: Path) -> str:
    """An empty database of the same kind as ``url``."""
    if url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'second.db'}"
    reset_server_database(url)
    database = Database(resolve_url(url))
    try:
        _migrations.upgrade(database)
    finally:
        database.close()
    return url


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_export_import_export_round_trips_exactly(
    filled: tuple[str, list[str]], tmp_path: Path, fmt: str
) -> None:
    url, ids = filled
    with ConversationStore(url) as store:
        first = _export(store, fmt, conversation_ids=None)
        history = [json.dumps([m.content for m in store.get(i).history()]) for i in ids]
    target = _empty_again(url, tmp_path)
    with ConversationStore(target) as store:
        imported = import_history(store, io.StringIO(first))
        assert imported == (3, 0, 15)
        second = _export(store, fmt)
        assert second == first
        assert [json.dumps([m.content for m in store.get(i).history()]) for i in ids] == history


def test_jsonl_records(filled: tuple[str, list[str]]) -> None:
    url, ids = filled
    with ConversationStore(url) as store:
        lines = [
            json.loads(line) for line in _export(store, conversation_ids=[ids[0]]).splitlines()
        ]
    assert lines[0]["record"] == "conversation"
    assert lines[0]["metadata"] == {"k": [1, "ü"]}
    messages = [line for line in lines if line["record"] == "message"]
    assert [m["seq"] for m in messages] == list(range(1, 15))
    assert lines[0]["format"] == 2
    assert lines[0]["archived_through_seq"] > 0
    kinds = [line["record"] for line in lines]
    assert kinds[-1] == "end"
    assert lines[-1] == {"record": "end", "format": 2, "conversations": 1, "messages": 14}
    assert "archive" in kinds
    assert "summary" in kinds
    assert all(m["conversation_id"] == ids[0] for m in messages)
    assert messages[0]["content"] == [{"type": "text", "text": "turn 0: naïve café 🚀 "}]


def test_markdown_and_anthropic_formats(filled: tuple[str, list[str]]) -> None:
    url, ids = filled
    with ConversationStore(url) as store:
        markdown = _export(store, "markdown", conversation_ids=[ids[0]])
        anthropic_lines = _export(store, "anthropic", conversation_ids=ids[:2]).splitlines()
    assert markdown.startswith("# Travel\n")
    assert "## User · turn 1" in markdown
    assert "turn 0: naïve café 🚀" in markdown  # archived turns included
    assert '[calls tool lookup with {"z": 1, "a": 2}]' in markdown
    request = json.loads(anthropic_lines[0])
    assert request["model"] == "claude-haiku-5-5"
    assert request["system"] == "Be kind."
    assert request["messages"][0]["role"] == "user"
    # 14 turns; the tool call follows an assistant turn, so the two are one message.
    assert len(request["messages"]) == 13
    assert request["messages"][-2]["content"][-1]["type"] == "tool_use"
    assert json.loads(anthropic_lines[1])["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "just one turn"}]}
    ]


def test_export_filters(filled: tuple[str, list[str]]) -> None:
    url, ids = filled
    with ConversationStore(url) as store:
        ada = [json.loads(x) for x in _export(store, user_id="ada").splitlines()]
        assert {r["id"] for r in ada if r["record"] == "conversation"} == {ids[0]}
        with pytest.raises(ConversationNotFound):
            _export(store, conversation_ids=[ids[0], "conv_missing"])
        with pytest.raises(InvalidInput, match="format"):
            _export(store, "xml")


def test_an_existing_id_is_an_error_unless_told(filled: tuple[str, list[str]]) -> None:
    url, ids = filled
    with ConversationStore(url) as store:
        dump = _export(store)
        with pytest.raises(InvalidInput, match="already exists"):
            import_history(store, io.StringIO(dump))
        assert import_history(store, io.StringIO(dump), on_conflict="skip") == (0, 3, 0)
        assert import_history(store, io.StringIO(dump), on_conflict="new-id") == (3, 0, 15)
        assert len(store.list()) == 6
        copies = [c for c in store.list() if c.id not in ids]
        assert sorted(c.message_count for c in copies) == [0, 1, 14]


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda lines: [*lines[:3], "{not json", *lines[3:]], "line 4: is not valid JSON"),
        (lambda lines: lines[:5] + lines[6:], "line 6: seq must be 5"),
        (
            lambda lines: [
                lines[0],
                lines[1].replace('"role":"user"', '"role":"robot"'),
                *lines[2:],
            ],
            "line 2: role must be",
        ),
        (lambda lines: lines[1:], "line 1: the message record names conversation"),
        (
            lambda lines: [lines[0], lines[1].replace("turn 0: naïve café 🚀 ", " "), *lines[2:]],
            "line 2: content[0].text",
        ),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_imported(
    filled: tuple[str, list[str]], tmp_path: Path, mangle: object, problem: str
) -> None:
    url, ids = filled
    with ConversationStore(url) as store:
        lines = _export(store, conversation_ids=[ids[0]]).splitlines()
    bad = "\n".join(mangle(lines)) + "\n"  # type: ignore[operator]
    target = _empty_again(url, tmp_path)
    with ConversationStore(target) as store:
        with pytest.raises(InvalidInput) as caught:
            import_history(store, io.StringIO(bad))
        assert str(caught.value).startswith(problem), str(caught.value)
        assert store.list() == []


# -- format 2: the archive state travels, and the file is checked whole ------------------


class _PaidSummarizer:
    """A summarizer that reports a model and usage, as Claude's does."""

    def summarize(
        self, previous: str | None, turns: list[Any], *, target_tokens: int | None = None
    ) -> SummaryResult:
        return SummaryResult(
            f"{previous or ''} summary of turns {turns[0].seq}-{turns[-1].seq}.",
            model="claude-haiku-5-5",
            usage={"input_tokens": 100 * len(turns), "output_tokens": 42},
            summarizer="claude",
        )


def _compacted(store: ConversationStore) -> str:
    conv = store.create(title="compacted", token_budget=9_000)
    for i in range(20):
        conv.add("user" if i % 2 == 0 else "assistant", f"turn {i} about the tram to Zürich")
        if i in (7, 13):
            assert conv.compact() is not None
    return conv.id


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def _dump(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


def test_a_compacted_conversation_imports_compacted(migrated_url: str, tmp_path: Path) -> None:
    with ConversationStore(migrated_url, summarizer=_PaidSummarizer()) as store:
        conv_id = _compacted(store)
        before = store.get(conv_id)
        assert before.archived_through_seq > 0
        first = _export(store)
        summary = before.summary()
        usage = store.usage()
        assert usage.total.requests == 2  # the two summaries
    target = _empty_again(migrated_url, tmp_path)
    with ConversationStore(target, summarizer=_PaidSummarizer()) as store:
        assert import_history(store, io.StringIO(first)) == (1, 0, 20)
        after = store.get(conv_id)
        assert after.archived_through_seq == before.archived_through_seq
        assert after.summary() == summary
        assert store.usage() == usage  # the summaries' requests and cost came along
        assert store.verify() == []
        assert _export(store) == first  # the same bytes
        # The imported archive is live history: the next compaction continues from it.
        window = after.window(compact=False)
        assert window.first_seq == after.archived_through_seq + 1


def test_format_1_exports_still_import(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, ids = filled
    with ConversationStore(url) as store:
        records = _lines(_export(store))
        history = [json.dumps([m.content for m in store.get(i).history()]) for i in ids]
    old = []
    for record in records:
        if record["record"] in ("archive", "summary", "end"):
            continue
        if record["record"] == "conversation":
            record["format"] = 1
            del record["archived_through_seq"]
        old.append(record)
    target = _empty_again(url, tmp_path)
    with ConversationStore(target) as store:
        assert import_history(store, io.StringIO(_dump(old))) == (3, 0, 15)
        assert [json.dumps([m.content for m in store.get(i).history()]) for i in ids] == history
        assert store.get(ids[0]).archived_through_seq == 0  # format 1 had no archive


def _tamper_block(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    block = next(r for r in records if r["record"] == "archive")
    block["checksum"] = "0" * 64
    return records


def _drop_block(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = next(i for i, r in enumerate(records) if r["record"] == "archive")
    return records[:index] + records[index + 1 :]


def _other_text_in_block(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    message = next(r for r in records if r["record"] == "message")
    message["content"] = [{"type": "text", "text": "not what the block holds"}]
    return records


def _drop_last_message(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = max(i for i, r in enumerate(records) if r["record"] == "message")
    return records[:index] + records[index + 1 :]


def _no_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["record"] != "summary"]


def _archived_past_end(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records[0]["archived_through_seq"] = 99
    return records


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (_tamper_block, "checksum mismatch"),
        (_drop_block, "blocks must cover turns"),
        (_other_text_in_block, "the block's turns differ from the message records"),
        (_no_summary, "no summary covers them"),
        (_archived_past_end, "past the last turn"),
        (lambda r: r[:-1], "ends without its end record"),
        (_drop_last_message, "the end record counts 1 conversations and 20 messages"),
        (lambda r: [{**r[0], "format": 3}, *r[1:]], "export format 3 is newer"),
        (lambda r: [{**r[0], "format": "2"}, *r[1:]], "no known export format version"),
        (lambda r: [*r, r[-1]], "a record after the end record"),
    ],
)
def test_import_checks_the_archive_and_the_end_record(
    migrated_url: str, tmp_path: Path, mangle: Any, problem: str
) -> None:
    with ConversationStore(migrated_url, summarizer=_PaidSummarizer()) as store:
        _compacted(store)
        records = _lines(_export(store))
    target = _empty_again(migrated_url, tmp_path)
    with ConversationStore(target) as store:
        with pytest.raises(InvalidInput, match=re.escape(problem)):
            import_history(store, io.StringIO(_dump(mangle(records))))
        assert store.list() == []


def test_a_truncated_json_export_is_refused(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, _ = filled
    with ConversationStore(url) as store:
        document = json.loads(_export(store, "json"))
    assert document[-1] == {"record": "end", "format": 2, "conversations": 3, "messages": 15}
    target = _empty_again(url, tmp_path)
    with ConversationStore(target) as store:
        with pytest.raises(InvalidInput, match="ends without its end record"):
            import_history(store, io.StringIO(json.dumps(document[:-1])))
        with pytest.raises(InvalidInput, match="the end record counts"):
            import_history(store, io.StringIO(json.dumps(document[1:])))
        assert store.list() == []


def _corrupt_first_block(url: str, conversation_id: str) -> None:
    database = Database(resolve_url(url))
    try:
        with database.transaction(write=True) as session:
            session.execute(
                update(ArchiveBlockRow)
                .where(ArchiveBlockRow.conversation_id == conversation_id)
                .values(payload="bm90IHpsaWI=")
            )
    finally:
        database.close()


def test_a_bad_conversation_fails_the_export_or_is_skipped(
    filled: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, ids = filled
    _corrupt_first_block(url, ids[0])
    with ConversationStore(url) as store:
        with pytest.raises(ExportFailed, match=f"{ids[0]} cannot be exported.*--skip-bad"):
            _export(store)
        out = io.StringIO()
        done = export_history(store, out, skip_bad=True)
        assert done.conversations == 2
        assert [cid for cid, _ in done.skipped] == [ids[0]]
        assert "cannot be decoded" in done.skipped[0][1]
        records = _lines(out.getvalue())
    assert ids[0] not in json.dumps(records[:-1])
    assert records[-1]["skipped"][0]["id"] == ids[0]
    target = _empty_again(url, tmp_path)
    with ConversationStore(target) as store:
        assert import_history(store, io.StringIO(out.getvalue())) == (2, 0, 1)


# -- hostile files: every turn gets the checks add() makes ------------------------------


def _one_conversation(**message: Any) -> list[dict[str, Any]]:
    conversation = {
        "record": "conversation",
        "format": 2,
        "id": "conv_01JD0000000000000000000000",
        "metadata": {},
        "archived_through_seq": 0,
        "created_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T00:00:00+00:00",
    }
    turn = {
        "record": "message",
        "conversation_id": conversation["id"],
        "seq": 1,
        "role": "user",
        "content": [{"type": "text", "text": "hello"}],
        "created_at": "2026-01-01T00:00:00+00:00",
        **message,
    }
    end = {"record": "end", "format": 2, "conversations": 1, "messages": 1}
    return [conversation, turn, end]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "file: is empty"),
        (b"\n  \n", "file: is empty"),
        (b"\x00\x01\x02binary\x00", "binary file"),
        ('{"record":"conversation"}\n'.encode("utf-16"), "not UTF-8"),
        (b'{"record": "conversation", "format": 2, "title": "caf\xe9"}\n', "not UTF-8"),
        (gzip.compress(b"garbage")[:12], "gzip"),
        (
            _dump(_one_conversation(content=[{"type": "text", "text": "a\\ud800b"}]))
            .replace("\\\\ud800", "\\ud800")
            .encode(),
            "line 2: contains a lone surrogate",
        ),
        (
            _dump(_one_conversation())
            .replace('"metadata":{}', '"metadata":{"k":"\\ud800"}')
            .encode(),
            "line 1: contains a lone surrogate",
        ),
        (_dump(_one_conversation(created_at="0001-01-01T00:00:00+14:00")).encode(), "out of range"),
        (_dump(_one_conversation(created_at="2026-01-01T00:00:00")).encode(), "no time zone"),
        (_dump(_one_conversation(usage="lots")).encode(), "usage must be an object"),
        (
            _dump(_one_conversation(usage={"input_tokens": "12"})).encode(),
            "usage.input_tokens must be a whole number",
        ),
        (_dump(_one_conversation(latency_ms=2**40)).encode(), "latency_ms must be a whole number"),
        (_dump(_one_conversation(model=["x"])).encode(), "model must be a string"),
        (
            _dump(_one_conversation())
            .replace('"usage"', '"x"')
            .replace('"role":"user"', '"role":"user","deep":' + "[" * 5_000 + "]" * 5_000)
            .encode(),
            "line 2: is nested too deeply",
        ),
        (_dump(_one_conversation(role="system")).encode(), "role must be 'user' or 'assistant'"),
        (
            _dump(_one_conversation(content="word " * 1_200_000)).encode(),
            "line 2: content needs about",
        ),
        (
            _dump(
                [
                    {k: v for k, v in r.items() if k != "conversation_id"}
                    for r in _one_conversation()
                ]
            ).encode(),
            "line 2: the message record has no conversation_id",
        ),
    ],
)
def test_hostile_files_are_refused_with_a_clear_error(
    migrated_url: str, data: bytes, problem: str
) -> None:
    with ConversationStore(migrated_url) as store:
        with pytest.raises(InvalidInput, match=re.escape(problem)):
            import_history(store, io.BytesIO(data))
        assert store.list() == []
        assert store.usage().total.requests == 0


def test_gzip_and_a_bom_are_read(migrated_url: str) -> None:
    text = _dump(_one_conversation(usage={"input_tokens": 5, "output_tokens": 7}, role="user"))
    with ConversationStore(migrated_url) as store:
        assert import_history(store, io.BytesIO(gzip.compress(text.encode()))) == (1, 0, 1)
        again = import_history(
            store, io.BytesIO(b"\xef\xbb\xbf" + text.encode()), on_conflict="new-id"
        )
        assert again == (1, 0, 1)
        assert import_history(store, io.StringIO("\ufeff" + text), on_conflict="skip") == (0, 1, 0)


def test_redact_storage_applies_to_imports(migrated_url: str, tmp_path: Path) -> None:
    secret = "write to ada.lovelace@example.com please"
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.create(title=secret, system=secret, metadata={"note": secret})
        for i in range(8):
            conv.add("user" if i % 2 == 0 else "assistant", f"{secret} {i}")
        conv.compact()
        dump = _export(store)
    assert "ada.lovelace" in _lines(dump)[-2]["text"]  # the summary quotes it
    target = _empty_again(migrated_url, tmp_path)
    with ConversationStore(target, redact_storage=True) as store:
        import_history(store, io.StringIO(dump))
        assert store.verify() == []
        texts = [m.text for m in store.get(conv.id).history()]
        assert all("ada.lovelace@example.com" not in t for t in texts)
        assert "ada.lovelace" not in _export(store)  # turns, blocks, title, system, metadata
        assert store.search("lovelace") == []


# -- other tools' histories ----------------------------------------------------------------


def test_anthropic_messages_import(migrated_url: str) -> None:
    params = [
        {"role": "user", "content": "What is a tram?"},
        {"role": "assistant", "content": [{"type": "text", "text": "A streetcar."}]},
        {"role": "user", "content": "Thanks"},
    ]
    with ConversationStore(migrated_url) as store:
        assert import_history(store, io.StringIO(json.dumps(params, indent=2))) == (1, 0, 3)
        request = {"model": "claude-haiku-5-5", "system": "Be brief.", "messages": params}
        assert import_history(store, io.StringIO(json.dumps(request))) == (1, 0, 3)
        convs = sorted(store.list(), key=lambda c: c.id)
        assert [m.to_param() for m in convs[0].history()][1] == params[1]
        assert convs[1].system == "Be brief."
        assert convs[1].model == "claude-haiku-5-5"
        # convo's own anthropic export reads back as the same requests.
        exported = _export(store, "anthropic")
        assert import_history(store, io.StringIO(exported)) == (2, 0, 6)
        with pytest.raises(InvalidInput, match="message 2: content"):
            import_history(store, io.StringIO(json.dumps([params[0], {"role": "assistant"}])))
        with pytest.raises(InvalidInput, match="a MessageParam has only role and content"):
            import_history(store, io.StringIO(json.dumps([{**params[0], "name": "x"}])))


LLM_LOGS = [
    {
        "id": "01h9tcvvqxgfvnwdx12143g660",
        "model": "claude-haiku-5-5",
        "prompt": "And in winter?",
        "system": "Be brief.",
        "prompt_json": None,
        "options_json": {},
        "response": "Colder, with snow.",
        "response_json": None,
        "conversation_id": "01h9tcvvq3p58g7fsxgfdv9vqr",
        "duration_ms": 812,
        "datetime_utc": "2026-09-08T12:41:00.000001",
        "input_tokens": 30,
        "output_tokens": 6,
        "conversation_name": "Weather",
        "conversation_model": "claude-haiku-5-5",
    },
    {
        "id": "01h9tcvvqxgfvnwdx12143g659",
        "model": "claude-haiku-5-5",
        "prompt": "What is the weather like in Zürich?",
        "system": "Be brief.",
        "response": "Mild.",
        "conversation_id": "01h9tcvvq3p58g7fsxgfdv9vqr",
        "duration_ms": 556,
        "datetime_utc": "2026-09-08T12:39:27.158398",
        "input_tokens": 20,
        "output_tokens": 2,
        "conversation_name": "Weather",
        "conversation_model": "claude-haiku-5-5",
    },
    {
        "id": "01h9tdaaaaaaaaaaaaaaaaaaaa",
        "model": "gpt-4o-mini",
        "prompt": "Ten names for a pet pelican",
        "system": None,
        "response": "Pelly, ...",
        "conversation_id": "01h9tdaaaaaaaaaaaaaaaaaaab",
        "duration_ms": 1000,
        "datetime_utc": "2026-09-09T08:00:00",
        "conversation_name": "Pelicans",
        "conversation_model": "gpt-4o-mini",
    },
]


def test_llm_logs_json_import(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        assert import_history(store, io.StringIO(json.dumps(LLM_LOGS, indent=2))) == (2, 0, 6)
        weather = store.get("conv_01H9TCVVQ3P58G7FSXGFDV9VQR")
        assert weather.title == "Weather"
        assert weather.system == "Be brief."
        history = weather.history()
        assert [(m.role, m.text) for m in history] == [
            ("user", "What is the weather like in Zürich?"),
            ("assistant", "Mild."),
            ("user", "And in winter?"),
            ("assistant", "Colder, with snow."),
        ]
        assert history[1].usage == {"input_tokens": 20, "output_tokens": 2}
        assert history[1].latency_ms == 556
        assert history[0].created_at.isoformat() == "2026-09-08T12:39:27.158398+00:00"
        assert weather.metadata["llm_conversation_id"] == "01h9tcvvq3p58g7fsxgfdv9vqr"
        # Importing the same logs again is a conflict, which --on-conflict skip settles.
        with pytest.raises(InvalidInput, match="already exists"):
            import_history(store, io.StringIO(json.dumps(LLM_LOGS)))
        assert import_history(store, io.StringIO(json.dumps(LLM_LOGS)), on_conflict="skip") == (
            0,
            2,
            0,
        )
        # One record per line (as `llm logs --json --nl` writes them) reads the same.
        lines = "".join(json.dumps(record) + "\n" for record in LLM_LOGS)
        assert import_history(store, io.StringIO(lines), on_conflict="new-id") == (2, 0, 6)
        with pytest.raises(InvalidInput, match="record 2: has no conversation_id"):
            import_history(store, io.StringIO(json.dumps([LLM_LOGS[0], {"prompt": "hi"}])))


def test_the_compaction_state_round_trips(migrated_url: str, tmp_path: Path) -> None:
    """Issue 9: where requests start and the summarizer's backoff travel with the export."""
    from convo._compaction import Backoff
    from convo._models import utcnow

    retry_at = utcnow().replace(microsecond=0)
    with ConversationStore(migrated_url, summarizer=_PaidSummarizer()) as store:
        conv_id = _compacted(store)
        store.records.set_compaction_state(
            conv_id, window_start_seq=17, backoff=Backoff(failures=2, retry_at=retry_at)
        )
        first = _export(store)
    (record,) = [r for r in _lines(first) if r["record"] == "conversation"]
    assert (record["window_start_seq"], record["compaction_failures"]) == (17, 2)
    target = _empty_again(migrated_url, tmp_path)
    with ConversationStore(target, summarizer=_PaidSummarizer()) as store:
        assert import_history(store, io.StringIO(first)) == (1, 0, 20)
        after = store.get(conv_id)
        assert after.window_start_seq == 17
        assert after.compaction_failures == 2
        assert after.compaction_retry_at == retry_at
        assert _export(store) == first
        # An export from before these fields existed imports with no state at all.
        old = _lines(first)
        for key in ("window_start_seq", "compaction_failures", "compaction_retry_at"):
            del old[0][key]
        store.delete(conv_id)
        assert import_history(store, io.StringIO(_dump(old))) == (1, 0, 20)
        again = store.get(conv_id)
        assert (again.window_start_seq, again.compaction_failures) == (0, 0)
        assert again.compaction_retry_at is None
        # A start past the turn after the last is refused, naming the line.
        store.delete(conv_id)
        bad = _lines(first)
        bad[0]["window_start_seq"] = 99
        with pytest.raises(InvalidInput, match=r"line 1.*window_start_seq 99"):
            import_history(store, io.StringIO(_dump(bad)))
