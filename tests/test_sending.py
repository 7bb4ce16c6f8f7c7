"""conv.send() and conv.stream() through the real SDK against the fake Messages API."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from sqlalchemy import event, text

from convo import (
    APIError,
    ConversationBusy,
    InvalidInput,
    MissingAPIKey,
    StreamInterrupted,
)
from convo._budget import DEFAULT_MODEL
from tests.conftest import summarizing_reply
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI, Reply

pytestmark = pytest.mark.faces

FAST_RETRY = 0.001  # the SDK ignores retry-after of 0


@pytest.fixture
def store(migrated_url: str, api_client: anthropic.Anthropic) -> Iterator[ConversationStore]:
    with ConversationStore(migrated_url, client=api_client) as opened:
        yield opened


def _messages_requests(fake: FakeMessagesAPI) -> list[Any]:
    return [r for r in fake.requests if r.path == "/v1/messages"]


def test_send_stores_both_turns_with_usage(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create(system="Be brief.")
    reply = conv.send("Hello there", max_tokens=300, metadata={"user_id": "u-1"})
    assert reply.text == "echo: Hello there"
    assert reply.role == "assistant"
    assert reply.seq == 2
    assert reply.model == DEFAULT_MODEL
    assert reply.stop_reason == "end_turn"
    (request,) = _messages_requests(fake_api)
    assert reply.request_id == request.request_id
    assert reply.usage == request.response["usage"]
    assert set(reply.usage or {}) >= {
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    }
    assert reply.latency_ms is not None
    assert reply.latency_ms >= 0
    body = request.body
    assert body["max_tokens"] == 300
    assert body["metadata"] == {"user_id": "u-1"}
    assert not {"temperature", "top_p", "top_k"} & set(body)
    history = store.get(conv.id).history()
    assert [(m.role, m.text) for m in history] == [
        ("user", "Hello there"),
        ("assistant", "echo: Hello there"),
    ]
    assert history[1].usage == request.response["usage"]


def test_the_user_turn_is_committed_before_the_call(
    migrated_url: str, fake_api: FakeMessagesAPI, store: ConversationStore
) -> None:
    conv = store.create()
    seen: list[list[str]] = []

    def reply(body: dict[str, Any]) -> Reply:
        with ConversationStore(migrated_url) as other:  # another connection, mid-call
            seen.append([m.text for m in other.get(conv.id).history()])
        return summarizing_reply(body)

    fake_api.reply = reply
    conv.send("durable?")
    assert seen == [["durable?"]]


def test_a_send_is_two_transactions(store: ConversationStore) -> None:
    """The claim, the user turn and the window's read are one transaction; the reply and
    the claim's end the other. Nothing else touches the database on a plain send."""
    conv = store.create()
    conv.send("warm up")  # the calibration is read once per interval
    transactions: list[str] = []

    def begun(connection: Any) -> None:
        transactions.append(
            "write" if connection.get_execution_options().get("convo_write") else "read"
        )

    event.listen(store.database.engine, "begin", begun)
    try:
        conv.send("how many trips?")
        assert transactions == ["write", "write"]
        transactions.clear()
        with pytest.raises(InvalidInput):
            conv.send("too much output", max_tokens=10_000_000)
        assert transactions == []  # refused before anything was written
    finally:
        event.remove(store.database.engine, "begin", begun)
    assert [m.text for m in conv.history()][-2:] == ["how many trips?", "echo: how many trips?"]


def test_a_large_max_tokens_streams_under_the_hood(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    reply = conv.send("long answer please", max_tokens=64_000)
    assert reply.text == "echo: long answer please"
    (request,) = _messages_requests(fake_api)
    assert request.stream is True


def test_a_failed_call_keeps_the_user_turn_and_the_next_send_is_valid(
    migrated_url: str, fake_api: FakeMessagesAPI
) -> None:
    client = anthropic.Anthropic(base_url=fake_api.base_url, api_key="test-key")
    with ConversationStore(migrated_url, client=client, max_retries=1) as store:
        conv = store.create()
        fake_api.fail_next(500, times=2, retry_after=FAST_RETRY)
        with pytest.raises(APIError) as caught:
            conv.send("first question")
        assert caught.value.status_code == 500
        assert caught.value.error_type == "api_error"
        assert caught.value.request_id
        assert isinstance(caught.value.__cause__, anthropic.InternalServerError)
        assert len(_messages_requests(fake_api)) == 2  # the SDK's one retry, no more
        history = conv.history()
        assert [(m.role, m.status) for m in history] == [("user", "failed")]
        reply = conv.send("second question")
        last = _messages_requests(fake_api)[-1]
        assert last.status == 200
        texts = [b["text"] for b in last.body["messages"][0]["content"]]
        assert texts == ["first question", "second question"]  # nothing lost, one user turn
        assert reply.seq == 3
        assert [m.role for m in conv.history()] == ["user", "user", "assistant"]


def test_rate_limited_then_retried_by_the_sdk_stores_one_reply(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.fail_next(429, retry_after=FAST_RETRY)
    reply = conv.send("hi")
    assert reply.text == "echo: hi"
    assert [r.status for r in _messages_requests(fake_api)] == [429, 200]
    assert [m.role for m in conv.history()] == ["user", "assistant"]


def test_overloaded_after_retries_is_a_convo_error(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.fail_next(529, times=3, retry_after=FAST_RETRY)
    with pytest.raises(APIError) as caught:
        conv.send("hi")
    assert caught.value.status_code == 529
    assert caught.value.error_type == "overloaded_error"
    assert "overloaded" in str(caught.value).lower()


def test_max_tokens_stop_is_surfaced(store: ConversationStore, fake_api: FakeMessagesAPI) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text="word " * 500))
    reply = conv.send("ramble", max_tokens=20)
    assert reply.truncated
    assert reply.stop_reason == "max_tokens"


def test_stream_yields_deltas_and_stores_the_reply(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    with conv.stream("stream me a reply") as reply:
        deltas = list(reply)
    assert len(deltas) > 1
    assert "".join(deltas) == "echo: stream me a reply"
    assert reply.message is not None
    assert reply.message.text == "echo: stream me a reply"
    assert reply.message.status == "complete"
    assert reply.message.usage == _messages_requests(fake_api)[0].response["usage"]
    assert _messages_requests(fake_api)[0].stream


def test_stream_without_iterating_still_stores_the_reply(store: ConversationStore) -> None:
    conv = store.create()
    with conv.stream("quiet") as reply:
        pass
    assert reply.message is not None
    assert reply.message.text == "echo: quiet"


def test_a_dropped_stream_keeps_partial_text_and_the_next_send_works(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text="The answer is forty-two, as everyone knows."))
    fake_api.drop_stream_after(8)
    received: list[str] = []
    with pytest.raises(StreamInterrupted) as caught, conv.stream("tell me") as reply:
        received.extend(reply)
    assert caught.value.status_code is None
    partial = "".join(received)
    assert partial
    assert "The answer is forty-two".startswith(partial[:10])
    history = conv.history()
    assert [(m.role, m.status) for m in history] == [
        ("user", "complete"),
        ("assistant", "incomplete"),
    ]
    assert history[1].text == partial
    assert reply.message == history[1]
    conv.send("go on")
    last = _messages_requests(fake_api)[-1]
    assert last.status == 200
    assert last.body["messages"][1]["content"] == [{"type": "text", "text": partial}]


def test_an_error_event_mid_stream(store: ConversationStore, fake_api: FakeMessagesAPI) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text="Some text that will be cut off halfway through."))
    fake_api.error_event_after(6)
    with pytest.raises(StreamInterrupted) as caught, conv.stream("hi") as reply:
        for _ in reply:
            pass
    assert caught.value.status_code == 200
    assert caught.value.error_type == "overloaded_error"
    assert conv.history()[-1].status == "incomplete"


def test_leaving_a_stream_early_keeps_what_arrived(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text="a long story " * 30))
    with conv.stream("story") as reply:
        for delta in reply:
            assert delta
            break
    assert reply.message is not None
    assert reply.message.status == "incomplete"
    assert reply.message.text


def test_a_tool_loop_end_to_end(store: ConversationStore, fake_api: FakeMessagesAPI) -> None:
    tools = [
        {
            "name": "weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    conv = store.create()
    fake_api.queue_reply(
        Reply(text="Let me check.", tool_uses=[{"name": "weather", "input": {"city": "Oslo"}}])
    )
    call = conv.send("Weather in Oslo?", tools=tools)
    assert call.stop_reason == "tool_use"
    (tool_use,) = [b for b in call.content if b["type"] == "tool_use"]
    assert tool_use["input"] == {"city": "Oslo"}
    fake_api.queue_reply(Reply(text="It is -3 °C and snowing in Oslo."))
    result = [{"type": "tool_result", "tool_use_id": tool_use["id"], "content": "-3 °C, snow"}]
    final = conv.send(result, tools=tools)
    assert final.text == "It is -3 °C and snowing in Oslo."
    last = _messages_requests(fake_api)[-1]
    assert last.status == 200
    assert last.body["tools"] == tools
    assert [m["role"] for m in last.body["messages"]] == ["user", "assistant", "user"]
    assert [m.role for m in conv.history()] == ["user", "assistant", "user", "assistant"]


def test_thinking_blocks_stay_with_their_model(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create(model="claude-opus-5-5")
    fake_api.queue_reply(Reply(text="Answer.", thinking="Let me think."))
    first = conv.send("q1", thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2000)
    assert first.content[0]["type"] == "thinking"
    conv.send("q2")
    assert _messages_requests(fake_api)[-1].body["messages"][1]["content"][0]["type"] == "thinking"
    conv.update(model="claude-sonnet-5-5")
    conv.send("q3")
    sent = _messages_requests(fake_api)[-1].body["messages"]
    assert all(b["type"] != "thinking" for m in sent for b in m["content"])
    assert conv.history()[1].content[0]["type"] == "thinking"  # still stored


def test_concurrent_sends_on_one_conversation_fail_fast(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.delay = 0.5
    outcomes: list[str] = []

    def send(text: str) -> None:
        try:
            store.get(conv.id).send(text)
            outcomes.append("sent")
        except ConversationBusy:
            outcomes.append("busy")

    threads = [threading.Thread(target=send, args=(f"message {i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["busy", "busy", "sent"]
    history = conv.history()
    assert [m.role for m in history] == ["user", "assistant"]  # nothing from the losers
    fake_api.delay = 0
    conv.send("after")  # the claim was released
    assert len(conv.history()) == 4


def test_a_crashed_senders_claim_expires(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client, send_lease=0.3) as store:
        conv = store.create()
        turn = store.turns.make_turn("user", "the sender dies after this")
        store.records.claim_and_append(conv.id, turn)  # and never releases
        with pytest.raises(ConversationBusy):
            conv.send("too soon")
        time.sleep(0.35)
        reply = conv.send("later")
        assert reply.text.startswith("echo: ")


def test_no_api_key_says_what_to_set_and_writes_nothing(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        conv = store.create()
        with pytest.raises(MissingAPIKey, match="ANTHROPIC_API_KEY"):
            conv.send("hello")
        assert conv.history() == []


def test_one_log_record_per_call_and_no_key_anywhere(
    migrated_url: str, fake_api: FakeMessagesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-ant-api03-SECRETSECRETSECRET"
    fake_api.api_key = secret
    client = anthropic.Anthropic(base_url=fake_api.base_url, api_key=secret, max_retries=0)
    with (
        caplog.at_level(logging.DEBUG, logger="convo"),
        ConversationStore(migrated_url, client=client) as store,
    ):
        conv = store.create()
        conv.send("hello")
        fake_api.fail_next(400, message="bad things")
        with pytest.raises(APIError) as caught:
            conv.send("again")
        calls = [r for r in caplog.records if r.name == "convo.api"]
        assert [r.convo["outcome"] for r in calls] == ["ok", "error"]  # type: ignore[attr-defined]
        ok = calls[0].convo  # type: ignore[attr-defined]
        assert ok["conversation_id"] == conv.id
        assert ok["request_id"]
        assert ok["input_tokens"] + ok["cache_creation_input_tokens"] > 0
        with store.database.transaction() as session:
            dump = json.dumps(
                [
                    list(map(str, row))
                    for row in session.execute(text("SELECT * FROM convo_messages"))
                ]
            )
    assert secret not in caplog.text
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    assert secret not in dump


def test_redaction_of_requests_and_of_storage(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    pii = "Mail me at ada@example.com"
    with ConversationStore(migrated_url, client=api_client, redact_requests=True) as store:
        conv = store.create()
        conv.send(pii)
        sent = _messages_requests(fake_api)[-1].body["messages"][0]["content"][0]["text"]
        assert sent == "Mail me at [REDACTED:email]"
        assert conv.history()[0].text == pii  # stored as written
    with ConversationStore(migrated_url, client=api_client, redact_storage=True) as store:
        conv = store.create()
        fake_api.queue_reply(Reply(text="Noted: bob@example.org"))
        reply = conv.send(pii)
        assert conv.history()[0].text == "Mail me at [REDACTED:email]"
        assert reply.text == "Noted: [REDACTED:email]"  # replies are stored redacted too
        assert conv.history()[1].text == "Noted: [REDACTED:email]"
        conv.add("user", "card 4242 4242 4242 4242")
        assert conv.history()[-1].text == "card [REDACTED:card]"


def test_default_model_is_current(monkeypatch: pytest.MonkeyPatch, migrated_url: str) -> None:
    from typing import get_args

    from anthropic._data import DEPRECATED_MODELS
    from anthropic.types.model_param import ModelParam

    known = get_args(get_args(ModelParam)[0])
    assert DEFAULT_MODEL in known
    assert DEFAULT_MODEL not in DEPRECATED_MODELS
    monkeypatch.setenv("CONVO_MODEL", "claude-haiku-5-5")
    with ConversationStore(migrated_url) as store:
        assert store.model == "claude-haiku-5-5"
        assert store.create().effective_model == "claude-haiku-5-5"
        assert store.create(model="claude-opus-5-5").effective_model == "claude-opus-5-5"
    with ConversationStore(migrated_url, model="claude-sonnet-4-6") as store:
        assert store.create().effective_model == "claude-sonnet-4-6"


def test_record_accepts_a_dict_of_the_response_shape(store: ConversationStore) -> None:
    conv = store.create()
    conv.add("user", "hi")
    conv.context()
    message = conv.record(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-5-5",
            "content": [{"type": "text", "text": "hello from a dict"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 900, "output_tokens": 5},
            "_request_id": "req_dict",
        }
    )
    assert (message.text, message.request_id, message.usage) == (
        "hello from a dict",
        "req_dict",
        {"input_tokens": 900, "output_tokens": 5},
    )
    with pytest.raises(InvalidInput, match=r"response\.role"):
        conv.record({"role": "user", "content": []})
    assert len(conv.history()) == 2


def test_the_stores_concurrency_limit_holds_across_conversations(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    fake_api.delay = 0.3
    with ConversationStore(migrated_url, client=api_client, max_concurrent_requests=1) as store:
        conversations = [store.create() for _ in range(3)]
        started = time.monotonic()
        threads = [threading.Thread(target=c.send, args=("hi",)) for c in conversations]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        assert all(len(c.history()) == 2 for c in conversations)
    assert elapsed >= 0.9  # one request at a time, never three at once
