"""Sends under faults: cut streams, usage of cut replies, bad parameters, bad text,
idempotency keys, calibration errors and the client-side limits of every API call."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import pytest
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from convo import (
    APIError,
    DatabaseUnavailable,
    InvalidInput,
    InvalidMessage,
    StreamInterrupted,
)
from convo._ratelimit import RateLimiter
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI, Reply
from tests.test_ratelimit import FakeClock

pytestmark = pytest.mark.faces


@pytest.fixture
def store(migrated_url: str, api_client: anthropic.Anthropic) -> Iterator[ConversationStore]:
    with ConversationStore(migrated_url, client=api_client) as opened:
        yield opened


def _messages_requests(fake: FakeMessagesAPI) -> list[Any]:
    return [r for r in fake.requests if r.path == "/v1/messages"]


@contextmanager
def failing_statements(
    store: ConversationStore, fails: Callable[[str, Any], bool]
) -> Iterator[None]:
    """Statements for which ``fails(sql, parameters)`` is true fail as a lost database would."""
    engine = store.database.engine

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if fails(statement, parameters):
            raise sa_exc.OperationalError(statement, parameters, Exception("disk I/O error"))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", before)


# --- streams ---------------------------------------------------------------------------------


STORY = "The answer is forty-two, as everyone who has read the book knows."


def test_a_stream_that_ends_cleanly_before_message_stop_is_cut(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text=STORY))
    fake_api.end_stream_after(8)
    received: list[str] = []
    with pytest.raises(StreamInterrupted, match="message_stop"), conv.stream("tell me") as reply:
        received.extend(reply)
    assert _messages_requests(fake_api)[0].stream_outcome == "ended"
    history = conv.history()
    assert [(m.role, m.status) for m in history] == [
        ("user", "complete"),
        ("assistant", "incomplete"),
    ]
    assert history[1].text == "".join(received)
    assert STORY.startswith(history[1].text)
    assert history[1].stop_reason is None
    # What message_start reported is stored, and counted as a billed request.
    assert history[1].usage is not None
    usage = history[1].usage
    reported_input = sum(
        usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    assert reported_input > 0
    report = store.usage(conversation_id=conv.id).total
    assert report.requests == 1
    assert report.total_input_tokens == reported_input
    assert report.cost_usd is not None
    assert report.cost_usd > 0
    assert store.records.release(conv.id) is False  # the claim was released


def test_a_cut_stream_without_iterating_and_under_send(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text=STORY))
    fake_api.end_stream_after(6)
    with pytest.raises(StreamInterrupted), conv.stream("quiet"):
        pass
    assert conv.history()[-1].status == "incomplete"
    # send() streams under the hood for a large max_tokens: the same rule holds.
    fake_api.queue_reply(Reply(text=STORY))
    fake_api.end_stream_after(7)
    with pytest.raises(StreamInterrupted, match="message_stop"):
        conv.send("again", max_tokens=64_000)
    assert _messages_requests(fake_api)[-1].stream
    last = conv.history()[-1]
    assert (last.role, last.status) == ("assistant", "incomplete")
    assert last.usage is not None
    assert store.usage(conversation_id=conv.id).total.requests == 2
    # And the conversation goes on.
    assert conv.send("go on").status == "complete"


def test_a_stream_cut_after_message_delta_keeps_the_reported_output_usage(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text="short"))
    # message_start, ping, block start, 2 deltas, block stop, message_delta: then the end.
    fake_api.end_stream_after(7)
    with pytest.raises(StreamInterrupted), conv.stream("hi") as reply:
        list(reply)
    (request,) = _messages_requests(fake_api)
    assert request.usage is not None
    assert reply.message is not None
    assert reply.message.usage is not None
    assert reply.message.usage["output_tokens"] == request.usage["output_tokens"]


def test_completed_streams_store_their_request_id(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    with conv.stream("hello") as reply:
        list(reply)
    big = conv.send("and again", max_tokens=64_000)
    first, second = _messages_requests(fake_api)
    assert reply.message is not None
    assert reply.message.request_id == first.request_id
    assert big.request_id == second.request_id
    assert [m.request_id for m in conv.history()[1::2]] == [first.request_id, second.request_id]


def test_only_documented_usage_fields_are_stored(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    fake_api.extra_usage = {"inference_geo": "us-east", "speed": "standard"}
    conv = store.create()
    sent = conv.send("hi")
    with conv.stream("streamed") as reply:
        list(reply)
    for message in (sent, reply.message, *conv.history()[1::2]):
        assert message is not None
        assert message.usage is not None
        assert set(message.usage) == {
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "cache_creation",
            "service_tier",
        }
        assert set(message.usage["cache_creation"]) == {
            "ephemeral_5m_input_tokens",
            "ephemeral_1h_input_tokens",
        }


def test_a_cancelled_stream_counts_in_stats(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    fake_api.queue_reply(Reply(text="a long story " * 30))
    with conv.stream("story") as reply:
        for _ in reply:
            break
    total = store.usage(conversation_id=conv.id).total
    assert total.requests == 1
    assert total.total_input_tokens > 0


# --- checks before anything is written -------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"stream": True}, "stream"),
        ({"model": "claude-opus-5-5"}, "model"),
        ({"messages": []}, "messages"),
        ({"system": "x"}, "system"),
    ],
)
def test_bad_send_parameters_write_and_send_nothing(
    store: ConversationStore, fake_api: FakeMessagesAPI, params: dict[str, Any], field: str
) -> None:
    conv = store.create()
    with pytest.raises(InvalidInput) as caught:
        conv.send("hello", **params)
    assert caught.value.field == field
    with pytest.raises(InvalidInput), conv.stream("hello", **params):
        pass
    assert conv.history() == []
    assert fake_api.requests == []
    assert store.records.release(conv.id) is False  # no claim was taken either


@pytest.mark.parametrize(
    ("role", "block"),
    [
        ("user", {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}),
        ("user", {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web", "input": {}}),
        ("assistant", {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}),
    ],
)
def test_misplaced_tool_blocks_are_rejected_at_write_time(
    store: ConversationStore, role: str, block: dict[str, Any]
) -> None:
    conv = store.create()
    with pytest.raises(InvalidMessage, match=block["type"]) as caught:
        conv.add(role, [{"type": "text", "text": "see"}, block])
    assert caught.value.field == "content[1].type"
    assert conv.history() == []


LONE = "bad \ud800 text"


def test_lone_surrogates_are_rejected_everywhere_at_write_time(store: ConversationStore) -> None:
    for fields in ({"title": LONE}, {"user_id": LONE}, {"system": LONE}, {"metadata": {"k": LONE}}):
        with pytest.raises(InvalidInput, match="lone surrogate"):
            store.create(**fields)
    with pytest.raises(InvalidInput, match="lone surrogate"):
        store.create(system=[{"type": "text", "text": LONE}])
    assert store.list() == []
    conv = store.create()
    with pytest.raises(InvalidMessage, match="lone surrogate"):
        conv.add("user", LONE)
    with pytest.raises(InvalidMessage, match="lone surrogate"):
        conv.add("user", [{"type": "text", "text": "ok"}, {"type": "text", "text": LONE}])
    with pytest.raises(InvalidInput, match="lone surrogate"):
        conv.update(title=LONE)
    with pytest.raises(InvalidInput, match="lone surrogate"):
        conv.send(LONE)
    assert conv.history() == []
    assert conv.refresh().title is None


# --- calibration never fails a send --------------------------------------------------------


def test_a_database_error_while_calibrating_does_not_fail_the_send(
    store: ConversationStore, fake_api: FakeMessagesAPI, caplog: pytest.LogCaptureFixture
) -> None:
    conv = store.create()
    with failing_statements(
        store, lambda sql, _: "convo_calibration" in sql and "SELECT" not in sql
    ):
        reply = conv.send("first send to this model " * 60)
    assert reply.text.startswith("echo: ")
    assert [m.role for m in conv.history()] == ["user", "assistant"]
    assert "calibration of" in caplog.text
    assert store.records.release(conv.id) is False


# --- idempotency keys ------------------------------------------------------------------------


@contextmanager
def lost_commit_acknowledgements() -> Iterator[None]:
    """Every commit succeeds, then its caller hears that the connection dropped."""

    def after_commit(_session: Session) -> None:
        raise sa_exc.OperationalError("COMMIT", None, Exception("server closed the connection"))

    event.listen(Session, "after_commit", after_commit)
    try:
        yield
    finally:
        event.remove(Session, "after_commit", after_commit)


def test_add_with_a_key_after_an_ambiguous_commit_stores_one_turn(
    store: ConversationStore,
) -> None:
    conv = store.create()
    with lost_commit_acknowledgements(), pytest.raises(DatabaseUnavailable):
        conv.add("user", "pay invoice 17", key="op-17")
    # The commit did happen: a retry with the same key finds it.
    again = conv.add("user", "pay invoice 17", key="op-17")
    assert again.seq == 1
    assert [m.text for m in conv.history()] == ["pay invoice 17"]
    other = conv.add("assistant", "done", key="op-18")
    assert other.seq == 2
    assert conv.add("assistant", "done", key="op-18") == other
    with pytest.raises(InvalidInput, match="key"):
        conv.add("user", "x", key="")
    with pytest.raises(InvalidInput, match="key"):
        conv.add("user", "x", key="k" * 101)


def test_send_with_a_key_returns_the_stored_reply_instead_of_sending_again(
    store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    conv = store.create()
    first = conv.send("what is 2+2?", key="q-1")
    again = conv.send("what is 2+2?", key="q-1")
    assert again == first
    with conv.stream("what is 2+2?", key="q-1") as reply:
        assert "".join(reply) == first.text
    assert reply.message == first
    assert len(_messages_requests(fake_api)) == 1
    assert [m.role for m in conv.history()] == ["user", "assistant"]


def test_send_with_a_key_whose_call_failed_sends_the_stored_turn_again(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    client = api_client.with_options(max_retries=0)
    with ConversationStore(migrated_url, client=client) as store:
        conv = store.create()
        fake_api.fail_next(500)
        with pytest.raises(APIError):
            conv.send("retry me", key="r-1")
        reply = conv.send("retry me", key="r-1")
        assert reply.seq == 2
        assert [(m.role, m.status, m.text) for m in conv.history()] == [
            ("user", "complete", "retry me"),
            ("assistant", "complete", "echo: retry me"),
        ]


# --- every API call goes through the client-side limits ------------------------------------


def test_summaries_and_token_counts_wait_for_the_rate_limit(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    clock = FakeClock()
    with ConversationStore(
        migrated_url, client=api_client, exact_token_counts=True, requests_per_minute=2
    ) as store:
        store.rate_limiter = RateLimiter(requests_per_minute=2, clock=clock, sleep=clock.sleep)
        conv = store.create()
        for i in range(3):
            conv.add("user", f"question {i}")
            conv.add("assistant", f"answer {i}")
        conv.add("user", "and now?")
        conv.context()  # a count_tokens call
        conv.context()  # another
        assert conv.compact() is not None  # a summary from Claude
        conv.context()
        paths = [r.path for r in fake_api.requests]
    assert paths.count("/v1/messages/count_tokens") >= 3
    assert paths.count("/v1/messages") == 1
    # Two requests per minute: every request after the first two waited its turn.
    assert len(paths) >= 4
    assert clock.now >= 60.0 * ((len(paths) - 1) // 2)


def _cli(*args: str, input: str | None = None, env: dict[str, str]) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from convo._cli import cli

    result = CliRunner().invoke(cli, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_convo_send_and_chat_report_a_cut_stream(
    migrated_url: str, fake_api: FakeMessagesAPI
) -> None:
    env = {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake_api.base_url}
    with ConversationStore(migrated_url) as store:
        conv_id = store.create().id
    fake_api.queue_reply(Reply(text=STORY))
    fake_api.end_stream_after(8)
    code, out, err = _cli("send", conv_id, "tell me", "--db", migrated_url, env=env)
    assert code == 1
    assert out.strip()
    assert STORY.startswith(out.strip())
    assert "message_stop" in err
    fake_api.queue_reply(Reply(text=STORY))
    code, _, err = _cli("send", conv_id, "again", "--json", "--db", migrated_url, env=env)
    assert code == 0  # not streamed: a plain create, complete
    fake_api.queue_reply(Reply(text=STORY))
    fake_api.end_stream_after(8)
    code, _, err = _cli(
        "chat", conv_id, "--db", migrated_url, input="tell me more\n/exit\n", env=env
    )
    assert code == 0
    assert "message_stop" in err
    with ConversationStore(migrated_url) as store:
        statuses = [(m.role, m.status) for m in store.get(conv_id).history()]
    assert statuses == [
        ("user", "complete"),
        ("assistant", "incomplete"),
        ("user", "complete"),
        ("assistant", "complete"),
        ("user", "complete"),
        ("assistant", "incomplete"),
    ]


# --- a turn the API rejects can be left out --------------------------------------------------

BMP = {"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": "Qk0="}}


def test_a_turn_the_api_rejects_is_named_and_can_be_excluded(
    migrated_url: str, fake_api: FakeMessagesAPI
) -> None:
    env = {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake_api.base_url}
    with ConversationStore(migrated_url) as store:
        conv = store.create()
        conv.add("user", "first")
        conv.add("assistant", "noted")
        conv.add("user", [{"type": "text", "text": "look at this"}, BMP])
        conv.add("assistant", "a picture")
    code, _, err = _cli("send", conv.id, "what was it?", "--db", migrated_url, env=env)
    assert code == 1
    assert "message 2 of the request, made from turn 3" in err
    assert f"convo exclude {conv.id} SEQ" in err
    code, out, _ = _cli("exclude", conv.id, "3", "--db", migrated_url, env=env)
    assert (code, out.strip()) == (0, f"turn 3 of {conv.id} is excluded from requests")
    code, out, err = _cli("send", conv.id, "and now?", "--db", migrated_url, env=env)
    assert code == 0, err
    code, out, _ = _cli("exclude", conv.id, "3", "--include", "--db", migrated_url, env=env)
    assert (code, out.strip()) == (0, f"turn 3 of {conv.id} is included again in requests")


def test_exclude_leaves_a_turn_out_of_requests_and_keeps_it_stored(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client.with_options(max_retries=0)) as store:
        conv = store.create()
        conv.add("user", "first")
        conv.add("assistant", "noted")
        conv.add("user", [{"type": "text", "text": "look at this"}, BMP])
        conv.add("assistant", "a picture")
        with pytest.raises(APIError) as caught:
            conv.send("what was it?")
        assert caught.value.status_code == 400
        assert caught.value.turn_seqs == (3,)
        assert "conv.exclude(SEQ)" in str(caught.value)
        with pytest.raises(InvalidInput, match="no turn 99"):
            conv.exclude(99)
        conv.exclude(3)
        reply = conv.send("and now?")
        assert reply.status == "complete"
        sent = [r for r in fake_api.requests if r.path == "/v1/messages"][-1].body["messages"]
        assert all(b.get("type") != "image" for m in sent for b in m["content"])
        texts = [b.get("text") for m in sent for b in m["content"]]
        assert "look at this" not in texts
        assert texts[:2] == ["first", "noted"]
        history = conv.history()
        assert history[2].status == "excluded"
        assert history[2].content[1] == BMP  # still stored
        assert [m.role for m in history[4:]] == ["user", "user", "assistant"]
        conv.include(3)
        assert conv.history()[2].status == "complete"
        with pytest.raises(APIError):
            conv.send("and the picture?")
