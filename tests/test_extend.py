"""``conv.extend(turns)``: many turns in one transaction, checked exactly like ``add``."""

from __future__ import annotations

from typing import Any

import pytest

from convo import (
    InvalidInput,
    InvalidMessage,
    MessageTooLarge,
    SummaryResult,
)
from tests.faces import ConversationStore

pytestmark = pytest.mark.faces


def _turns(count: int) -> list[Any]:
    turns: list[Any] = []
    for i in range(count):
        role = "user" if i % 2 == 0 else "assistant"
        text = f"turn {i}: the tram to Zürich leaves at {i % 24}:00 🚋"
        turns.append((role, text) if i % 3 else {"role": role, "content": text})
    return turns


def test_extend_appends_in_order_with_gap_free_seqs(store: ConversationStore) -> None:
    conv = store.create()
    conv.add("user", "before")
    conv.add("assistant", "reply")
    turns = _turns(10_000)
    stored = conv.extend(turns)
    assert [m.seq for m in stored] == list(range(3, 10_003))
    assert conv.message_count == 10_002
    history = store.get(conv.id).history()
    assert [m.seq for m in history] == list(range(1, 10_003))
    assert [m.text for m in history[2:]] == [
        t["content"] if isinstance(t, dict) else t[1] for t in turns
    ]
    # The same stored turn, token count and search entry as add() gives.
    other = store.create()
    added = other.add(*turns[4])
    assert (stored[4].content, stored[4].token_count) == (added.content, added.token_count)
    hits = store.search("turn 4999", conversation_id=conv.id)
    assert [h.seq for h in hits] == [5_002]
    conv.add("user", "after")
    assert store.get(conv.id).history()[-1].seq == 10_003
    assert conv.extend([]) == []


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        (("user", "   "), "content", "must contain non-whitespace text"),
        (("robot", "hi"), "role", "must be 'user' or 'assistant'"),
        (
            ("user", [{"type": "tool_use", "id": "t", "name": "x"}]),
            "content[0].input",
            "is required",
        ),
    ],
)
def test_a_bad_turn_anywhere_writes_nothing(
    store: ConversationStore, bad: tuple[str, Any], field: str, problem: str
) -> None:
    conv = store.create()
    turns = _turns(10_000)
    turns[5_000] = bad
    with pytest.raises(InvalidMessage) as caught:
        conv.extend(turns)
    assert caught.value.field == f"turns[5000].{field}"
    # Exactly the error add() gives for that turn.
    with pytest.raises(InvalidMessage) as added:
        conv.add(*bad)
    assert type(caught.value) is type(added.value)
    assert (added.value.field, added.value.problem) == (field, caught.value.problem)
    assert problem in caught.value.problem
    assert store.get(conv.id).message_count == 0
    assert conv.history() == []
    assert store.search("tram", conversation_id=conv.id) == []


def test_an_oversized_turn_or_a_bad_entry_writes_nothing(store: ConversationStore) -> None:
    conv = store.create(token_budget=2_000)
    turns = _turns(10)
    turns[3] = ("assistant", "word " * 5_000)
    with pytest.raises(MessageTooLarge, match="nothing was stored") as caught:
        conv.extend(turns)
    assert caught.value.field == "turns[3].content"
    for entry, field in (
        (("user",), "turns[1].turn"),
        ({"role": "user"}, "turns[1].content"),
        ({"role": "user", "content": "x", "name": "y"}, "turns[1].name"),
        ({"role": "user", "content": "x", "model": "claude-haiku-5-5"}, "turns[1].model"),
        ("user: hi", "turns[1].turn"),
    ):
        with pytest.raises(InvalidInput) as bad:  # InvalidMessage, or InvalidInput for model
            conv.extend([("user", "fine"), entry])
        assert bad.value.field == field
    assert conv.refresh().message_count == 0


def test_extend_records_the_writer_model_like_add(store: ConversationStore) -> None:
    conv = store.create(model="claude-sonnet-5-5")
    thinking = [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "answer"},
    ]
    stored = conv.extend(
        [
            ("user", "question"),
            {"role": "assistant", "content": "plain", "model": "claude-haiku-5-5"},
            ("user", "again"),
            ("assistant", thinking),
        ]
    )
    added = store.create(model="claude-sonnet-5-5").add("assistant", thinking)
    assert [m.model for m in stored] == [None, "claude-haiku-5-5", None, added.model]
    assert added.model == "claude-sonnet-5-5"


def test_extend_redacts_like_add(migrated_url: str) -> None:
    with ConversationStore(migrated_url, redact_storage=True) as store:
        conv = store.create()
        conv.extend([("user", "mail ada.lovelace@example.com"), ("assistant", "noted")])
        assert "ada.lovelace" not in conv.history()[0].text
        assert store.search("lovelace") == []


class _CountingSummarizer:
    def __init__(self) -> None:
        self.calls = 0

    def summarize(
        self, previous: str | None, turns: list[Any], *, target_tokens: int | None = None
    ) -> SummaryResult:
        self.calls += 1
        return SummaryResult(f"turns {turns[0].seq}-{turns[-1].seq} talked about trams.")


def test_extend_never_compacts_the_next_window_does(migrated_url: str) -> None:
    summarizer = _CountingSummarizer()
    with ConversationStore(migrated_url, summarizer=summarizer) as store:
        conv = store.create(token_budget=3_000)
        conv.extend(_turns(2_001))
        assert summarizer.calls == 0
        assert conv.archived_through_seq == 0
        window = conv.window()
        assert summarizer.calls >= 1
        assert conv.archived_through_seq > 0
        assert window.estimated_tokens <= conv.budget()
