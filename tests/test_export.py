"""Export and import: whole histories through archives, exact round trips, all-or-nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from convo import (
    ConversationNotFound,
    ConversationStore,
    ExtractiveSummarizer,
    InvalidInput,
    _migrations,
)
from convo._database import Database, resolve_url
from convo._export import export_history, import_history
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
    messages = lines[1:]
    assert [m["seq"] for m in messages] == list(range(1, 15))
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
        (lambda lines: lines[1:], "line 1: a message record must follow its conversation"),
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
