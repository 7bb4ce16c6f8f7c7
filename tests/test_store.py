"""ConversationStore and Conversation: the library calls, on every database."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from convo import (
    ConversationNotFound,
    InvalidInput,
    InvalidMessage,
    Message,
)
from tests.faces import ConversationStore

pytestmark = pytest.mark.faces


def test_create_and_get_round_trip(store: ConversationStore) -> None:
    before = datetime.now(UTC)
    conv = store.create(
        model="claude-sonnet-5-5",
        system="You are terse.",
        token_budget=20_000,
        title="Trip to Lisbon",
        user_id="user-7",
        metadata={"plan": "pro", "tags": ["travel"], "nested": {"ü": 1.5}},
    )
    loaded = store.get(conv.id)
    assert loaded.id == conv.id
    assert conv.id.startswith("conv_")
    assert (loaded.model, loaded.system, loaded.token_budget) == (
        "claude-sonnet-5-5",
        "You are terse.",
        20_000,
    )
    assert (loaded.title, loaded.user_id) == ("Trip to Lisbon", "user-7")
    assert loaded.metadata == {"plan": "pro", "tags": ["travel"], "nested": {"ü": 1.5}}
    assert loaded.created_at.tzinfo is UTC
    assert before - timedelta(seconds=1) <= loaded.created_at <= datetime.now(UTC)
    assert loaded.message_count == 0
    assert loaded.history() == []


def test_system_prompt_as_text_blocks(store: ConversationStore) -> None:
    system = [{"type": "text", "text": "Rules.", "cache_control": {"type": "ephemeral"}}]
    assert store.get(store.create(system=system).id).system == system


def test_add_and_history_keep_order_and_content(store: ConversationStore) -> None:
    conv = store.create()
    tool_turn = [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
    ]
    result_turn = [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "\u22123 °C, snow ❄️"},
    ]
    unknown = [{"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {}}]
    conv.add("user", "What's the weather in Oslo? 🇳🇴")
    conv.add("assistant", tool_turn)
    conv.add("user", result_turn)
    conv.add("assistant", unknown)
    history = store.get(conv.id).history()
    assert [m.seq for m in history] == [1, 2, 3, 4]
    assert [m.role for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0].content == [{"type": "text", "text": "What's the weather in Oslo? 🇳🇴"}]
    assert history[1].content == tool_turn
    assert history[2].content == result_turn
    assert history[3].content == unknown
    assert all(isinstance(m, Message) and m.token_count > 0 for m in history)
    assert history[0].text == "What's the weather in Oslo? 🇳🇴"
    assert history[1].to_param() == {"role": "assistant", "content": tool_turn}
    assert store.get(conv.id).message_count == 4


def test_content_key_order_is_kept(store: ConversationStore) -> None:
    block = {"type": "tool_use", "name": "f", "id": "toolu_9", "input": {"z": 1, "a": 2}}
    conv = store.create()
    conv.add("assistant", [block])
    stored = conv.history()[0].content[0]
    assert json.dumps(stored) == json.dumps(block)


def test_add_accepts_sdk_content_blocks(store: ConversationStore) -> None:
    from anthropic.types import TextBlock, ToolUseBlock

    conv = store.create()
    conv.add(
        "assistant",
        [
            TextBlock(type="text", text="hi"),
            ToolUseBlock(type="tool_use", id="toolu_2", name="f", input={"x": 1}),
        ],
    )
    content = conv.history()[0].content
    assert content[0]["text"] == "hi"
    assert content[1] == {"type": "tool_use", "id": "toolu_2", "name": "f", "input": {"x": 1}}


def test_caller_changes_after_add_change_nothing(store: ConversationStore) -> None:
    block = {"type": "text", "text": "original"}
    conv = store.create()
    returned = conv.add("user", [block])
    block["text"] = "changed"
    assert returned.content[0]["text"] == "original"
    assert conv.history()[0].content[0]["text"] == "original"


@pytest.mark.parametrize(
    ("role", "content", "field"),
    [
        ("system", "hi", "role"),
        ("USER", "hi", "role"),
        ("user", "", "content"),
        ("user", "   \n", "content"),
        ("user", [], "content"),
        ("user", {"type": "text", "text": "x"}, "content"),
        ("user", 42, "content"),
        ("user", ["just a string"], "content[0]"),
        ("user", [{"text": "no type"}], "content[0].type"),
        ("user", [{"type": "text", "text": "ok"}, {"type": "text", "text": ""}], "content[1].text"),
        ("user", [{"type": "text"}], "content[0].text"),
        ("assistant", [{"type": "tool_use", "id": "t", "name": "f"}], "content[0].input"),
        ("assistant", [{"type": "tool_use", "name": "f", "input": {}}], "content[0].id"),
        ("user", [{"type": "tool_result", "content": "x"}], "content[0].tool_use_id"),
        (
            "user",
            [
                {
                    "type": "tool_result",
                    "tool_use_id": "t",
                    "content": [{"type": "text", "text": ""}],
                }
            ],
            "content[0].content[0].text",
        ),
        ("assistant", [{"type": "thinking", "thinking": "hmm"}], "content[0].signature"),
        ("user", [{"type": "text", "text": "x", "extra": {1, 2}}], "content"),
        ("user", [{"type": "text", "text": "x", "n": float("nan")}], "content"),
    ],
)
def test_bad_turns_are_rejected_and_nothing_is_written(
    store: ConversationStore, role: object, content: object, field: str
) -> None:
    conv = store.create()
    conv.add("user", "kept")
    with pytest.raises(InvalidMessage) as caught:
        conv.add(role, content)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == field
    assert field in str(caught.value)
    assert [m.text for m in store.get(conv.id).history()] == ["kept"]
    assert store.get(conv.id).message_count == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"token_budget": 0}, "token_budget"),
        ({"token_budget": "1000"}, "token_budget"),
        ({"token_budget": True}, "token_budget"),
        ({"metadata": ["a"]}, "metadata"),
        ({"metadata": {1: "a"}}, "metadata"),
        ({"metadata": {"a": object()}}, "metadata"),
        ({"system": 5}, "system"),
        ({"system": [{"type": "image"}]}, "system"),
        ({"title": "x" * 501}, "title"),
        ({"user_id": 7}, "user_id"),
    ],
)
def test_bad_create_arguments(
    store: ConversationStore, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        store.create(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field
    assert store.list() == []


@pytest.mark.parametrize("bad_id", ["conv_nope", "", "conv_01ZZZZZZZZZZZZZZZZZZZZZZZZ", "x" * 500])
def test_unknown_id(store: ConversationStore, bad_id: str) -> None:
    with pytest.raises(ConversationNotFound) as caught:
        store.get(bad_id)
    assert isinstance(caught.value, LookupError)
    with pytest.raises(ConversationNotFound):
        store.delete(bad_id)


def test_unknown_id_on_add_writes_nothing(store: ConversationStore) -> None:
    conv = store.create()
    store.delete(conv.id)
    with pytest.raises(ConversationNotFound):
        conv.add("user", "hello?")
    with pytest.raises(ConversationNotFound):
        conv.history()


def test_list_newest_first_per_user_and_paginated(store: ConversationStore) -> None:
    made = [store.create(user_id="alice" if i % 2 == 0 else "bob", title=str(i)) for i in range(7)]
    assert [c.id for c in store.list()] == [c.id for c in reversed(made)]
    alice = [c.id for c in reversed(made) if c.user_id == "alice"]
    assert [c.id for c in store.list(user_id="alice")] == alice
    first = store.list(limit=3)
    second = store.list(limit=3, before=first[-1].id)
    third = store.list(limit=3, before=second[-1].id)
    paged = [c.id for c in first + second + third]
    assert paged == [c.id for c in reversed(made)]
    assert store.list(user_id="carol") == []
    with pytest.raises(InvalidInput):
        store.list(limit=0)


def test_delete_removes_conversation_and_turns(store: ConversationStore) -> None:
    keep, drop = store.create(), store.create()
    keep.add("user", "stay")
    drop.add("user", "go")
    store.delete(drop.id)
    with pytest.raises(ConversationNotFound):
        store.get(drop.id)
    assert [m.text for m in store.get(keep.id).history()] == ["stay"]
    assert [c.id for c in store.list()] == [keep.id]


def test_update_title_metadata_and_settings(store: ConversationStore) -> None:
    conv = store.create(title="old", metadata={"a": 1})
    created = conv.updated_at
    conv.update(title="new", metadata={"b": 2}, token_budget=5_000, model="claude-haiku-5-5")
    loaded = store.get(conv.id)
    assert (loaded.title, loaded.metadata, loaded.token_budget, loaded.model) == (
        "new",
        {"b": 2},
        5_000,
        "claude-haiku-5-5",
    )
    assert loaded.updated_at >= created
    conv.update(title=None)
    assert store.get(conv.id).title is None
    assert store.get(conv.id).metadata == {"b": 2}
    with pytest.raises(InvalidInput):
        conv.update(token_budget=-1)
    assert store.get(conv.id).token_budget == 5_000


def test_refresh_sees_other_writers(store: ConversationStore) -> None:
    conv = store.create()
    store.get(conv.id).add("user", "from elsewhere")
    assert conv.message_count == 0
    assert conv.refresh().message_count == 1


def test_continue_by_id_from_another_process(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        conv = store.create(title="shared")
        conv.add("user", "first, from the parent")
    script = (
        "import sys\n"
        "from convo import ConversationStore\n"
        "store = ConversationStore(sys.argv[1])\n"
        "conv = store.get(sys.argv[2])\n"
        "conv.add('assistant', 'second, from the child')\n"
        "print(conv.title, len(conv.history()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, migrated_url, conv.id],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert done.stdout.split() == ["shared", "2"]
    with ConversationStore(migrated_url) as store:
        assert [m.text for m in store.get(conv.id).history()] == [
            "first, from the parent",
            "second, from the child",
        ]


def test_iter_history_streams_in_order(store: ConversationStore) -> None:
    conv = store.create()
    for i in range(25):
        conv.add("user" if i % 2 == 0 else "assistant", f"turn {i}")
    assert [m.text for m in conv.iter_history()] == [f"turn {i}" for i in range(25)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"title": "a\x00b"}, "title"), ({"metadata": {"k": "a\x00b"}}, "metadata")],
)
def test_nul_characters_are_refused_where_postgres_cannot_store_them(
    store: ConversationStore, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidInput, match="NUL") as caught:
        store.create(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_nul_characters_in_content_are_stored_losslessly(store: ConversationStore) -> None:
    conv = store.create()
    conv.add("user", "before\x00after")
    assert store.get(conv.id).history()[0].text == "before\x00after"
