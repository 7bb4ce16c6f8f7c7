"""Editing a history: edit, delete a turn (a tool pair together), regenerate, find by prefix."""

from __future__ import annotations

from datetime import timedelta

import anthropic
import pytest

from convo import (
    APIError,
    ConversationBusy,
    ConversationNotFound,
    ExtractiveSummarizer,
    InvalidInput,
    StreamInterrupted,
)
from convo._humanize import parse_age, plural
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI, Reply

pytestmark = pytest.mark.faces


def _tool_conversation(store: ConversationStore) -> str:
    conv = store.create()
    conv.add("user", "weather in Lisbon?")  # 1
    conv.add(
        "assistant", [{"type": "tool_use", "id": "t1", "name": "weather", "input": {"c": "L"}}]
    )  # 2
    conv.add("user", [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}])  # 3
    conv.add("assistant", "It is sunny.")  # 4
    conv.add("user", "and Porto?")  # 5
    conv.add("assistant", "Rainy, probably.")  # 6
    return conv.id


def test_edit_replaces_a_live_turn_and_its_search_text(store: ConversationStore) -> None:
    conv = store.get(_tool_conversation(store))
    edited = conv.edit(5, "and Madrid?")
    assert (edited.seq, edited.role, edited.text) == (5, "user", "and Madrid?")
    assert [m.text for m in conv.history()][4] == "and Madrid?"
    assert [h.seq for h in store.search("Madrid")] == [5]
    assert store.search("Porto") == []
    assert store.verify() == []


def test_edit_keeps_tool_ids_and_refuses_archived_turns(store: ConversationStore) -> None:
    conv = store.get(_tool_conversation(store))
    with pytest.raises(InvalidInput, match="must keep its tool_use ids"):
        conv.edit(2, "no tool call any more")
    with pytest.raises(InvalidInput, match="there is no turn 9"):
        conv.edit(9, "x")
    summarizing = ConversationStore(store.url, summarizer=ExtractiveSummarizer())
    try:
        summarizing.get(conv.id).compact()
    finally:
        summarizing.close()
    with pytest.raises(InvalidInput, match="turn 1 is archived"):
        conv.edit(1, "rewrite history")
    assert conv.history()[0].text == "weather in Lisbon?"


def test_delete_turn_takes_the_tool_pair_and_renumbers(store: ConversationStore) -> None:
    conv = store.get(_tool_conversation(store))
    assert conv.delete_turn(3) == [2, 3]  # the result goes with its call
    history = conv.history()
    assert [(m.seq, m.text) for m in history] == [
        (1, "weather in Lisbon?"),
        (2, "It is sunny."),
        (3, "and Porto?"),
        (4, "Rainy, probably."),
    ]
    assert conv.message_count == 4
    assert [h.seq for h in store.search("Porto")] == [3]
    assert store.verify() == []
    # Appending continues the numbering without a gap.
    assert conv.add("user", "thanks").seq == 5
    params = conv.context()
    assert all("tool" not in str(m["content"]) for m in params["messages"])


def test_delete_the_call_takes_its_result(store: ConversationStore) -> None:
    conv = store.get(_tool_conversation(store))
    assert conv.delete_turn(2) == [2, 3]
    assert store.get(conv.id).message_count == 4


def test_editing_waits_for_no_send(store: ConversationStore) -> None:
    conv = store.get(_tool_conversation(store))
    store.records.claim_and_append(conv.id, store.turns.make_turn("user", "in flight"))
    with pytest.raises(ConversationBusy):
        conv.delete_turn(6)
    with pytest.raises(ConversationBusy):
        conv.edit(5, "x")
    assert store.get(conv.id).message_count == 7


def test_regenerate_replaces_the_last_reply(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        conv.send("first question")
        conv.add("assistant", "and a second thought")  # 3: taken back with the reply
        fake_api.queue_reply(Reply(text="a better answer"))
        reply = conv.regenerate(max_tokens=100)
        assert (reply.seq, reply.text, reply.status) == (2, "a better answer", "complete")
        assert [(m.seq, m.role, m.text) for m in conv.history()] == [
            (1, "user", "first question"),
            (2, "assistant", "a better answer"),
        ]
        assert fake_api.requests[-1].body["messages"] == fake_api.requests[0].body["messages"]
        with conv.regenerate_stream(max_tokens=100) as streamed:
            text = "".join(streamed)
        assert streamed.message is not None
        assert (streamed.message.seq, streamed.message.text) == (2, text)
        assert conv.refresh().message_count == 2
        conv.add("user", "only a question")
        with pytest.raises(InvalidInput, match="no reply to regenerate"):
            conv.regenerate()
        assert store.get(conv.id).message_count == 3


def _history(conv: object) -> list[tuple[int, str, str, str]]:
    return [(m.seq, m.role, m.status, m.text) for m in conv.history()]  # type: ignore[attr-defined]


def test_a_failed_regeneration_keeps_the_old_reply(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    """The old reply stays until a new one is stored: a failed call, a refused
    request and a call that never starts change nothing, and free the claim."""
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        conv.send("first question")
        before = _history(conv)
        fake_api.fail_next(400, message="bad things")
        with pytest.raises(APIError, match="bad things"):
            conv.regenerate(max_tokens=100)
        assert _history(conv) == before
        fake_api.fail_next(529, times=3, retry_after=0.001)  # the SDK's retries run out
        with pytest.raises(APIError), conv.regenerate_stream(max_tokens=100) as reply:
            "".join(reply)
        assert _history(conv) == before
        with pytest.raises(InvalidInput, match="max_tokens"):
            conv.regenerate(max_tokens=0)
        with pytest.raises(InvalidInput, match="takes no key"):
            conv.regenerate(key="k1")
        assert _history(conv) == before
        # Nothing holds the conversation: the next regeneration goes through.
        fake_api.queue_reply(Reply(text="at last"))
        assert conv.regenerate(max_tokens=100).text == "at last"
        assert [m.text for m in conv.history()] == ["first question", "at last"]


def test_a_regeneration_cut_short_keeps_the_old_reply_and_the_new_text(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    """A stream a proxy ends before ``message_stop``: the old reply stays the answer
    and what arrived is kept too, excluded from requests (and its usage counted)."""
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        conv.send("first question")
        before = _history(conv)
        fake_api.queue_reply(Reply(text="a new answer that is cut short somewhere"))
        fake_api.end_stream_after(6)
        with (
            pytest.raises(StreamInterrupted, match="previous reply stays"),
            conv.regenerate_stream(max_tokens=100) as reply,
        ):
            "".join(reply)
        after = _history(conv)
        assert after[:2] == before
        assert [(seq, role, status) for seq, role, status, _ in after[2:]] == [
            (3, "assistant", "excluded")
        ]
        assert after[2][3]
        assert "a new answer that is cut short somewhere".startswith(after[2][3])
        assert store.usage(conversation_id=conv.id).total.requests == 2
        conv.send("next question")
        sent = fake_api.requests[-1].body["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert before[1][3] in str(sent[1])


def test_a_regeneration_waits_for_a_send_in_flight(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        conv.send("first question")
        before = _history(conv)
        with conv.stream("second question") as streaming:
            with pytest.raises(ConversationBusy):
                conv.regenerate(max_tokens=100)
            "".join(streaming)
        assert _history(conv)[:2] == before
        assert conv.regenerate(max_tokens=100).seq == 4


def test_find_by_prefix_and_latest(store: ConversationStore) -> None:
    assert store.latest() is None
    first, second = store.create(), store.create()
    assert store.find(first.id) == first
    assert store.find(first.id[5:].lower()) == first
    assert store.find(second.id[:-1]) == second
    shared = next(i for i, (a, b) in enumerate(zip(first.id, second.id, strict=True)) if a != b)
    with pytest.raises(InvalidInput, match="matches several conversations") as raised:
        store.find(first.id[:shared])
    assert first.id in str(raised.value)
    assert second.id in str(raised.value)
    with pytest.raises(ConversationNotFound):
        store.find("conv_ZZZZ")
    with pytest.raises(ConversationNotFound):
        store.find("not-an-id!")
    first.add("user", "newest activity")
    latest = store.latest()
    assert latest is not None
    assert latest.id == first.id


def test_plural_and_ages() -> None:
    assert plural(1, "request") == "1 request"
    assert plural(0, "request") == "0 requests"
    assert plural(1_000, "message") == "1,000 messages"
    assert plural(2, "reply", "replies") == "2 replies"
    assert parse_age("6mo") == timedelta(days=180)
    assert parse_age("1y") == timedelta(days=365)
    assert parse_age("30min") == timedelta(minutes=30)
    assert parse_age("12 h") == timedelta(hours=12)
    assert parse_age("2w") == timedelta(weeks=2)
    assert parse_age("90D") == timedelta(days=90)
    with pytest.raises(InvalidInput, match="ambiguous"):
        parse_age("6m")
    for bad in ("soon", "0d", "6 parsecs", "-1d"):
        with pytest.raises(InvalidInput):
            parse_age(bad)


def test_search_by_phrase_prefix_role_and_date(store: ConversationStore) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import update

    from convo._models import MessageRow

    conv = store.create()
    conv.add("user", "please explain the refund policy")
    conv.add("assistant", "our policy on refunds: refund within thirty days")
    conv.add("user", "policy refund details, again")
    with store.database.transaction(write=True) as session:
        session.execute(
            update(MessageRow)
            .where(MessageRow.conversation_id == conv.id, MessageRow.seq == 1)
            .values(created_at=datetime(2026, 1, 5, tzinfo=UTC))
        )
    assert sorted(h.seq for h in store.search("refund policy")) == [1, 2, 3]
    assert [h.seq for h in store.search('"refund policy"')] == [1]
    assert [h.seq for h in store.search('"policy refund"')] == [3]
    assert sorted(h.seq for h in store.search("refun*")) == [1, 2, 3]
    assert [h.seq for h in store.search("refun* thirty")] == [2]
    assert [h.seq for h in store.search("refund", role="assistant")] == [2]
    assert sorted(
        h.seq for h in store.search("policy", since=datetime(2026, 6, 1, tzinfo=UTC))
    ) == [
        2,
        3,
    ]
    assert [h.seq for h in store.search("policy", until=datetime(2026, 6, 1, tzinfo=UTC))] == [1]
    with pytest.raises(InvalidInput, match="role"):
        store.search("policy", role="system")
    with pytest.raises(InvalidInput, match="at least one word"):
        store.search('"" *')


def test_closing_the_store_closes_only_the_client_it_made(
    migrated_url: str, api_client: anthropic.Anthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    store = ConversationStore(migrated_url)
    made = store.client
    store.close()
    assert made.is_closed()
    given = ConversationStore(migrated_url, client=api_client)
    used = given.client  # the async store's is an AsyncAnthropic made from api_client
    assert used is api_client or isinstance(used, anthropic.AsyncAnthropic)
    given.close()
    assert not api_client.is_closed()
    assert used is api_client or used.is_closed()  # closed by whoever made it: here, the test
