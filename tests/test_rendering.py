"""The request as rendered, through the public API against the fake Messages API.

Tool loops that outgrow the budget, the blocks convo adds, thinking blocks
and snapshot ids, and cache markers: each test reproduces a failure of the
context engine's render and cut code as a user would meet it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from convo import ConversationStore, InvalidInput
from convo._budget import DEFAULT_FACTOR
from convo._clearing import CLEARED_TOOL_RESULT
from convo._summarizer import SUMMARIZER_SYSTEM
from convo._turns import Turn
from convo._window import CONTINUED_USER_TEXT, MISSING_TOOL_RESULT, OMITTED_USER_TEXT
from tests.conftest import summarizing_reply
from tests.fakeapi import FakeMessagesAPI, Reply

TASK = "Task: read every page of the manual and tell me what it says about safety."
PAGE = "The operator checks the valve, logs the pressure and signs the sheet. " * 40
ROUNDS = 38
MARKED = {"type": "ephemeral"}
MARKED_TOOLS = [{"name": "f", "input_schema": {"type": "object"}, "cache_control": MARKED}]
MARKED_SYSTEM = [{"type": "text", "text": "sys", "cache_control": MARKED}]
THINK = {"type": "enabled", "budget_tokens": 1024}


class BrokenSummarizer:
    def summarize(self, previous: str | None, turns: Any, *, target_tokens: int) -> str:
        raise RuntimeError("summarizer is down")


def _agent(body: dict[str, Any]) -> Reply:
    """Summaries for the summarizer; for the conversation, always one more tool call."""
    if body.get("system") == SUMMARIZER_SYSTEM:
        return summarizing_reply(body)
    page = sum(1 for m in body["messages"] if m["role"] == "assistant")
    return Reply(tool_uses=[{"name": "read_page", "input": {"page": page}}])


def _conversation_requests(fake: FakeMessagesAPI) -> list[Any]:
    return [
        r
        for r in fake.requests
        if r.path == "/v1/messages" and r.body.get("system") != SUMMARIZER_SYSTEM
    ]


def _input(request: Any) -> int:
    usage = request.usage
    return int(
        usage["input_tokens"]
        + usage["cache_creation_input_tokens"]
        + usage["cache_read_input_tokens"]
    )


def _run_loop(store: ConversationStore, rounds: int) -> Any:
    conv = store.create(system="You are a careful technical reader.")
    reply = conv.send(TASK, max_tokens=300)
    for _ in range(rounds):
        call = reply.content[-1]
        assert call["type"] == "tool_use"
        result = {"type": "tool_result", "tool_use_id": call["id"], "content": PAGE}
        reply = conv.send([result], max_tokens=300)
    return conv


@pytest.fixture
def agent_api(fake_api: FakeMessagesAPI) -> Iterator[FakeMessagesAPI]:
    fake_api.reply = _agent
    return fake_api


# -- 3: tool loops are trimmed, not refused -------------------------------------------------


def test_a_long_tool_loop_runs_within_budget_by_clearing_and_cutting_inside_it(
    migrated_url: str, agent_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    # Each round is ~600 tokens; at a budget of 3,000 the loop used to stop at
    # round 4 with ContextTooLarge, because a window could only start at the task.
    with ConversationStore(migrated_url, client=api_client, token_budget=3_000) as store:
        conv = _run_loop(store, ROUNDS)
        requests = _conversation_requests(agent_api)
        assert len(requests) == ROUNDS + 1
        assert all(r.status == 200 for r in agent_api.requests)
        assert all(_input(r) <= 3_000 for r in requests)  # by the API's own count
        sent = [r.body["messages"] for r in requests]
        # Old results were cleared (their calls kept) before anything was cut...
        first_cleared = next(
            i
            for i, messages in enumerate(sent)
            if any(b.get("content") == CLEARED_TOOL_RESULT for m in messages for b in m["content"])
        )
        assert sent[first_cleared][0]["content"][0]["text"] == TASK
        # ... and later compaction archived part of the loop: the window opens
        # at a tool call, with a user turn that says the rest is summarized.
        conv.refresh()
        assert conv.archived_through_seq > 0
        opening = sent[-1][0]["content"]  # the summary (as data), then the opening
        assert opening[0]["text"].startswith("<conversation_summary>")
        assert opening[1:] == [{"type": "text", "text": CONTINUED_USER_TEXT}]
        assert sent[-1][1]["content"][0]["type"] == "tool_use"
        # Nothing stored changed: every result is in the history in full.
        history = conv.history()
        assert len(history) == 2 * (ROUNDS + 1)
        results = [m.content[0] for m in history if m.role == "user"][1:]
        assert all(block["content"] == PAGE for block in results)


def test_a_tool_loop_keeps_going_while_the_summarizer_is_down(
    migrated_url: str, agent_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(
        migrated_url, client=api_client, token_budget=3_000, summarizer=BrokenSummarizer()
    ) as store:
        conv = _run_loop(store, ROUNDS)
        requests = _conversation_requests(agent_api)
        assert all(r.status == 200 for r in requests)
        assert all(_input(r) <= 3_000 for r in requests)
        firsts = [r.body["messages"][0]["content"][0]["text"] for r in requests]
        # Clearing kept the task in the request for longer; then the oldest
        # rounds were left out, and the request says so.
        assert firsts[:8] == [TASK] * 8
        assert firsts[-1] == OMITTED_USER_TEXT
        conv.refresh()
        assert conv.archived_through_seq == 0


# -- 5: what convo adds is counted ----------------------------------------------------------


def test_error_results_for_unanswered_calls_are_counted(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        conv.add("user", "Book the ten flights.")
        calls = [
            {"type": "tool_use", "id": f"toolu_{i}", "name": "book", "input": {}} for i in range(10)
        ]
        conv.add("assistant", calls)
        conv.add("user", "Never mind.")
        window = conv.window(max_tokens=100)
        filled = window.params["messages"][2]["content"][:10]
        assert all(b["content"] == MISSING_TOOL_RESULT for b in filled)
        conv.record(api_client.messages.create(**conv.context(max_tokens=100)))
        actual = _input(fake_api.last_request)
        # The estimate covers what was sent (it was less than half of it).
        assert actual <= window.estimated_tokens
        # And with a budget that fits the stored turns but not the error
        # results, the unanswered calls are left out rather than sent over budget.
        conv.add("user", "And the hotel?")
        conv.update(token_budget=window.estimated_tokens - 10)
        tight = conv.window(max_tokens=100)
        assert tight.omitted_seqs
        assert tight.estimated_tokens <= window.estimated_tokens - 10


def test_what_rendering_adds_is_made_room_for_by_compaction_not_by_leaving_turns_out(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        for i in range(6):
            conv.add("user", f"Question {i}: " + PAGE[:400])
            conv.add("assistant", f"Answer {i}: " + PAGE[:400])
        calls = [
            {"type": "tool_use", "id": f"toolu_{i}", "name": "book", "input": {}} for i in range(10)
        ]
        conv.add("assistant", calls)
        conv.add("user", "Never mind.")
        stored = sum(m.token_count for m in conv.history())
        added = conv.window(compact=False).message_tokens - stored
        assert added > 100
        # A budget the stored turns fit, but not the request as rendered.
        conv.update(token_budget=math.ceil((stored + added // 2) * DEFAULT_FACTOR))
        window = conv.window()
        assert window.omitted_seqs == ()
        assert any(note.startswith("compacted turns") for note in window.notes)
        assert window.estimated_tokens <= conv.budget()


# -- 6: thinking blocks and the model that wrote them -----------------------------------------


def test_a_reply_recorded_under_its_snapshot_id_keeps_its_thinking(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    fake_api.snapshots = {"claude-sonnet-5-5": "claude-sonnet-5-5-20261001"}
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create(model="claude-sonnet-5-5")
        fake_api.queue_reply(
            Reply(thinking="I should look it up.", tool_uses=[{"name": "weather", "input": {}}])
        )
        reply = conv.send("Weather in Oslo?", thinking=THINK, max_tokens=2000)
        assert reply.model == "claude-sonnet-5-5-20261001"
        call = reply.content[-1]
        result = {"type": "tool_result", "tool_use_id": call["id"], "content": "4 C, rain"}
        # The API rejects a tool loop whose call lost its thinking block.
        answer = conv.send([result], thinking=THINK, max_tokens=2000)
        assert answer.text
        sent = fake_api.last_request.body["messages"]
        assert sent[1]["content"][0]["type"] == "thinking"


def test_thinking_added_by_hand_is_sent_only_to_the_model_that_wrote_it(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    thinking = {"type": "thinking", "thinking": "Check the log.", "signature": "sig"}
    call = {"type": "tool_use", "id": "toolu_1", "name": "log", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "empty"}
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create(model="claude-sonnet-5-5")
        conv.add("user", "Why did it fail?")
        added = conv.add("assistant", [thinking, call])
        assert added.model == "claude-sonnet-5-5"  # recorded: the conversation's model
        conv.add("user", [result])
        conv.record(api_client.messages.create(**conv.context(thinking=THINK, max_tokens=2000)))
        assert fake_api.last_request.status == 200
        assert fake_api.last_request.body["messages"][1]["content"][0] == thinking
        # Another model never sees it; nor does any model see thinking of unknown origin.
        conv.add("user", "Thanks.")
        conv.update(model="claude-opus-5-5")
        assert all(
            b["type"] != "thinking" for m in conv.context()["messages"] for b in m["content"]
        )
        conv.update(model="claude-sonnet-5-5")
        store.records.append(
            conv.id, Turn("assistant", [thinking, {"type": "text", "text": "ok"}], 20)
        )
        conv.add("user", "Bye.")
        sent = conv.context()["messages"]
        assert [b["type"] for b in sent[-2]["content"]] == ["text"]
        explicit = conv.add("assistant", [thinking, {"type": "text", "text": "x"}], model="m-1")
        assert explicit.model == "m-1"
        assert [m.model for m in conv.history()][-3:] == [None, None, "m-1"]
        with pytest.raises(InvalidInput, match="model"):
            conv.add("user", "hi", model="m-1")
        assert len(conv.history()) == 8  # nothing written


# -- 7: never more than four cache breakpoints --------------------------------------------------


def test_markers_nested_in_tool_results_are_stripped_when_too_many(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    # The caller's own markers: one on the tools, one on the system prompt.
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create(system=MARKED_SYSTEM)
        conv.add("user", "go")
        conv.add("assistant", [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}])
        nested = [{"type": "text", "text": f"part {i}", "cache_control": MARKED} for i in range(3)]
        conv.add("user", [{"type": "tool_result", "tool_use_id": "toolu_1", "content": nested}])
        reply = conv.send("and?", tools=MARKED_TOOLS)
        assert reply.text
        assert fake_api.last_request.status == 200
        stored = conv.history()[2].content[0]["content"]
        assert all("cache_control" in b for b in stored)  # stored as given


def test_a_top_level_cache_control_counts_as_a_breakpoint(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    # The caller's own markers: one on the tools, one on the system prompt.
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create(system=MARKED_SYSTEM)
        for question in ("one", "two", "three"):
            conv.send(question, tools=MARKED_TOOLS, cache_control=MARKED)
            assert fake_api.last_request.status == 200
        body = fake_api.last_request.body
        assert body["cache_control"] == MARKED
        # The automatic marker takes the newest turn; convo marks the previous one.
        assert "cache_control" not in body["messages"][-1]["content"][-1]
        assert "cache_control" in body["messages"][-3]["content"][-1]
        assert fake_api.last_request.usage["cache_read_input_tokens"] > 0
