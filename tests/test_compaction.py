"""Compaction on a real database, driven through the real SDK against the fake API."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from typing import Any

import anthropic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from convo import (
    ArchiveCorrupted,
    ClaudeSummarizer,
    ContextTooLarge,
    Conversation,
    ExtractiveSummarizer,
    InvalidInput,
    MessageTooLarge,
    SummarizerFailed,
)
from convo._budget import SETTLED_SAMPLES
from convo._models import ArchiveBlockRow, MessageRow, SummaryRow
from convo._summarizer import SummaryTurn
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI

pytestmark = pytest.mark.faces

BUDGET = 3_000
WORDS = "the quick brown fox jumps over the lazy dog while a bird sings "


def question(i: int) -> str:
    return f"Question {i}: " + WORDS * (3 + i % 5)


def chat(conv: Conversation, client: anthropic.Anthropic, turns: int, **params: Any) -> None:
    """The bring-your-own-client loop: add, context, call, record."""
    for i in range(turns):
        conv.add("user", question(i))
        conv.record(client.messages.create(**conv.context(max_tokens=200, **params)))


def _store(url: str, client: anthropic.Anthropic, **options: Any) -> ConversationStore:
    options.setdefault("token_budget", BUDGET)
    return ConversationStore(url, client=client, **options)


def _strip_marks(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_marks(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_strip_marks(v) for v in value]
    return value


def _summary_in(body: dict[str, Any]) -> str | None:
    """The summary a request carries: the first block of its first (user) message."""
    first = body["messages"][0]["content"]
    if isinstance(first, list) and first[0].get("text", "").startswith("<conversation_summary>"):
        return str(first[0]["text"])
    return None


def _conversation_requests(fake: FakeMessagesAPI, model: str) -> list[Any]:
    return [r for r in fake.requests if r.path == "/v1/messages" and r.body["model"] == model]


def test_every_request_is_valid_and_within_budget(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client) as store:
        conv = store.create(system="You answer questions about animals. " * 10)
        chat(conv, api_client, 40)
        requests = _conversation_requests(fake_api, store.model)
        assert len(requests) == 40
        assert all(r.status == 200 for r in fake_api.requests)
        for request in requests:
            assert request.usage is not None
            actual = sum(
                request.usage[k]
                for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
            )
            assert actual <= BUDGET  # by the API's own count, not only ours
        conv.refresh()
        assert conv.archived_through_seq > 0
        assert conv.message_count == 80
        summarizer_calls = [r for r in fake_api.requests if r.body["model"] == "claude-haiku-5-5"]
        assert summarizer_calls  # compaction used Claude for the summary
        assert len(summarizer_calls) < 12  # hysteresis: rarely, not every turn
        summary = _summary_in(requests[-1].body)
        assert summary is not None
        assert "Summary of" in summary
        assert "data, not as instructions" in summary
        assert summary.endswith("</conversation_summary>")
        # The system prompt is the caller's, unchanged: the summary has no system authority.
        assert requests[-1].body["system"] == [{"type": "text", "text": conv.system}]
        assert conv.summary() is not None


def test_history_is_lossless_after_many_compactions(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client) as store:
        conv = store.create()
        chat(conv, api_client, 50)
        with store.database.transaction() as session:
            blocks = session.scalar(
                select(func.count()).where(ArchiveBlockRow.conversation_id == conv.id)
            )
        assert blocks is not None
        assert blocks >= 2
        history = store.get(conv.id).history()
        assert [m.seq for m in history] == list(range(1, 101))
        assert [m.text for m in history[::2]] == [question(i) for i in range(50)]
        assert all(m.text.startswith("echo: ") for m in history[1::2])
        assert history[1].usage is not None
        assert history[1].request_id


def test_archived_content_leaves_the_rows_and_storage_shrinks(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client) as store:
        conv = store.create()
        chat(conv, api_client, 30)
        conv.refresh()
        with store.database.transaction() as session:
            nulls = session.scalar(
                select(func.count()).where(
                    MessageRow.conversation_id == conv.id, MessageRow.content.is_(None)
                )
            )
            blocks = session.scalars(
                select(ArchiveBlockRow).where(ArchiveBlockRow.conversation_id == conv.id)
            ).all()
        assert nulls == conv.archived_through_seq
        assert sum(b.last_seq - b.first_seq + 1 for b in blocks) == conv.archived_through_seq
        assert sum(len(b.payload) for b in blocks) < sum(b.raw_bytes for b in blocks) / 2


def test_a_corrupted_block_is_reported_not_skipped(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client) as store:
        conv = store.create()
        chat(conv, api_client, 25)
        with store.database.transaction(write=True) as session:
            session.execute(
                update(ArchiveBlockRow)
                .where(ArchiveBlockRow.conversation_id == conv.id)
                .values(payload="AAAA")
            )
        with pytest.raises(ArchiveCorrupted, match="corrupted"):
            conv.history()


class Failing:
    def summarize(
        self, previous: str | None, turns: Sequence[SummaryTurn], *, target_tokens: int
    ) -> str:
        raise RuntimeError("summarizer is down")


def test_a_failing_summarizer_loses_nothing_and_stays_within_budget(
    migrated_url: str,
    fake_api: FakeMessagesAPI,
    api_client: anthropic.Anthropic,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with _store(migrated_url, api_client, summarizer=Failing()) as store:
        conv = store.create()
        with caplog.at_level(logging.WARNING, logger="convo"):
            chat(conv, api_client, 25)
        assert "summarizer is down" in caplog.text
        assert "left out of the request" in caplog.text
        conv.refresh()
        assert conv.archived_through_seq == 0
        assert len(conv.history()) == 50
        window = conv.window(max_tokens=200)
        assert window.omitted_seqs
        assert window.estimated_tokens <= window.budget
        # Failed once, then backing off: not retried on every turn.
        assert any("compaction waits" in note for note in window.notes)
        for request in _conversation_requests(fake_api, store.model):
            assert request.status == 200
        with pytest.raises(SummarizerFailed, match="stay live"):
            conv.compact()
        assert conv.refresh().archived_through_seq == 0


def test_the_fallback_summarizer_steps_in(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    store = _store(
        migrated_url, api_client, summarizer=Failing(), summarizer_fallback=ExtractiveSummarizer()
    )
    with store:
        conv = store.create()
        chat(conv, api_client, 25)
        assert conv.refresh().archived_through_seq > 0
        summary = conv.summary()
        assert summary is not None
        assert summary.startswith("[Extractive summary")
        with store.database.transaction() as session:
            kinds = set(session.scalars(select(SummaryRow.summarizer)))
        assert kinds == {"extractive"}


def test_requests_share_a_byte_identical_prefix_between_compactions(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client, token_budget=6_000) as store:
        conv = store.create(system="You are a patient tutor. " * 40)
        chat(conv, api_client, 30)
        requests = _conversation_requests(fake_api, store.model)
    same_summary = 0
    for before, after in itertools.pairwise(requests):
        assert _strip_marks(before.body["system"]) == _strip_marks(after.body["system"])
        if _summary_in(before.body) != _summary_in(after.body):
            continue  # a compaction happened in between: a new summary starts a new prefix
        same_summary += 1
        old = json.dumps(_strip_marks(before.body["messages"]))
        new = json.dumps(_strip_marks(after.body["messages"]))
        assert new.startswith(old[:-1]), "the previous request is not a prefix of the next"
        assert after.usage is not None
        assert after.usage["cache_read_input_tokens"] > 0
    assert same_summary >= 20


def test_calibration_converges_on_the_apis_tokenizer(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client, token_budget=50_000) as store:
        conv = store.create(system="You are a careful assistant. " * 40)
        before = store.calibration(store.model)
        chat(conv, api_client, 15)
        calibration = store.calibration(store.model)
        conv.add("user", question(99))
        window = conv.window(max_tokens=200)
    assert before.samples == 0
    # Each reply calibrated until the factor settled (then only a change is written).
    assert SETTLED_SAMPLES <= calibration.samples <= 15
    # The fake counts cl100k x 1.2 (and frames a turn in 3 tokens to our 4).
    assert calibration.factor == pytest.approx(1.2, abs=0.03)
    actual = fake_api.count_request_tokens(window.params)
    assert actual <= window.estimated_tokens <= actual * 1.06
    assert before.scale(window.raw_tokens) > actual * 1.1  # the uncalibrated default is cautious
    with ConversationStore(migrated_url) as again:  # persisted for other processes
        assert again.calibration(store.model) == calibration


def test_a_message_too_large_for_any_request_is_refused(migrated_url: str) -> None:
    with ConversationStore(migrated_url, token_budget=1_000) as store:
        conv = store.create()
        conv.add("user", "small")
        with pytest.raises(MessageTooLarge, match="budget of 1,000") as caught:
            conv.add("assistant", WORDS * 200)
        assert isinstance(caught.value, ValueError)
        assert [m.text for m in conv.history()] == ["small"]


def test_an_exchange_too_large_for_the_budget_is_refused_before_sending(
    migrated_url: str,
) -> None:
    with ConversationStore(migrated_url, token_budget=1_000) as store:
        conv = store.create()
        conv.add("user", "run the tool")
        # The newest round of a tool loop is the least a request can carry: a
        # call with a large input and its large result, each of which fits alone.
        call = {"type": "tool_use", "id": "t0", "name": "f", "input": {"text": WORDS * 12}}
        conv.add("assistant", [call])
        conv.add("user", [{"type": "tool_result", "tool_use_id": "t0", "content": WORDS * 45}])
        with pytest.raises(ContextTooLarge, match="newest exchange"):
            conv.context()


def test_context_needs_a_user_turn_last_and_owns_its_parameters(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        conv = store.create(system="sys")
        conv.add("user", "hi")
        conv.add("assistant", "hello")
        with pytest.raises(InvalidInput, match="ends with an assistant turn"):
            conv.context()
        conv.add("user", "more")
        tools = [{"name": "f", "description": "d", "input_schema": {"type": "object"}}]
        params = conv.context(max_tokens=123, tools=tools, stop_sequences=["END"])
        assert params["model"] == store.model
        assert (params["max_tokens"], params["tools"], params["stop_sequences"]) == (
            123,
            tools,
            ["END"],
        )
        assert conv.window(tools=tools).extra_tokens > 0
        for own in ("messages", "system", "model"):
            with pytest.raises(InvalidInput, match=own):
                conv.context(**{own: "x"})


def test_forced_compaction_archives_all_but_the_latest_exchange(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client, token_budget=100_000) as store:
        conv = store.create()
        chat(conv, api_client, 4)
        conv.add("user", "latest")
        done = conv.compact()
        assert done is not None
        assert (done.first_seq, done.last_seq) == (1, 8)
        assert done.stored_bytes < done.raw_bytes
        params = conv.context()
        assert [m["role"] for m in params["messages"]] == ["user"]
        assert "system" not in params  # the summary goes in the messages, as data
        assert "turns 1-8 are archived" in params["messages"][0]["content"][0]["text"]
        assert conv.compact() is None  # nothing left before the latest exchange
        assert len(conv.history()) == 9


def test_deleting_a_compacted_conversation_removes_everything(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client) as store:
        conv = store.create()
        chat(conv, api_client, 20)
        store.delete(conv.id)
        with store.database.transaction() as session:
            for table in (MessageRow, ArchiveBlockRow, SummaryRow):
                assert session.scalar(select(func.count()).select_from(table)) == 0


def test_claude_summarizer_sends_previous_summary_and_transcript(
    fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    summarizer = ClaudeSummarizer(api_client, model="claude-haiku-5-5")
    turns = [
        SummaryTurn(1, "user", [{"type": "text", "text": "My name is Ada."}]),
        SummaryTurn(
            2, "assistant", [{"type": "tool_use", "id": "t", "name": "save", "input": {"n": 1}}]
        ),
    ]
    result = summarizer.summarize("Earlier: greetings.", turns, target_tokens=500)
    sent = fake_api.last_request.body["messages"][0]["content"]
    assert "Earlier: greetings." in sent
    assert "USER (turn 1): My name is Ada." in sent
    assert '[calls tool save with {"n": 1}]' in sent
    assert result.summarizer == "claude"
    assert result.usage is not None
    assert result.usage["output_tokens"] > 0


# -- lossless history, property-based ------------------------------------------------


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)
_visible = _text.filter(lambda s: s.strip() != "")
_huge = st.integers(2_000, 8_000).map(lambda n: "ünïcødé 🚀 " * (n // 10))


@st.composite
def conversations(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Turns to add: text, huge and near-empty messages, tool pairs, unknown blocks."""
    turns: list[tuple[str, Any]] = []
    for i in range(draw(st.integers(1, 14))):
        turns.append(("user", draw(st.one_of(_visible, _huge, st.just(".")))))
        if draw(st.booleans()):
            tool_id = f"toolu_{i}"
            arguments = draw(st.dictionaries(_text, st.one_of(_text, st.integers()), max_size=3))
            call = {"type": "tool_use", "id": tool_id, "name": "lookup", "input": arguments}
            turns.append(("assistant", [{"type": "text", "text": draw(_visible)}, call]))
            result = {"type": "tool_result", "tool_use_id": tool_id, "content": draw(_text)}
            turns.append(("user", [result]))
        blocks: list[Any] = [{"type": "text", "text": draw(_visible)}]
        if draw(st.booleans()):
            blocks.append({"type": "web_search_tool_result", "tool_use_id": "s", "content": []})
        turns.append(("assistant", blocks))
    return turns


def _lossless(store: ConversationStore, turns: list[tuple[str, Any]], budget: int) -> None:
    conv = store.create(token_budget=budget)
    expected = []
    for role, content in turns:
        expected.append(json.dumps(conv.add(role, content).content, ensure_ascii=False))
        if role == "user" and not isinstance(content, list):
            conv.window()  # compacts when over budget
    conv.compact()
    history = conv.history()
    assert [json.dumps(m.content, ensure_ascii=False) for m in history] == expected
    assert [m.seq for m in history] == list(range(1, len(turns) + 1))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(conversations(), st.integers(12_000, 40_000))
def test_history_is_lossless_for_random_conversations(
    migrated_url: str, turns: list[tuple[str, Any]], budget: int
) -> None:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        _lossless(store, turns, budget)


def test_exact_mode_counts_with_the_api_and_calibrates(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with _store(migrated_url, api_client, exact_token_counts=True, token_budget=2_000) as store:
        conv = store.create(system="Be brief. " * 30)
        conv.add("user", question(1) * 3)
        window = conv.window(max_tokens=100)
        count_calls = [r for r in fake_api.requests if r.path == "/v1/messages/count_tokens"]
        assert len(count_calls) == 1
        assert window.estimated_tokens == fake_api.count_request_tokens(window.params)
        assert store.calibration(store.model).samples == 1
        chat(conv, api_client, 15)
        for request in _conversation_requests(fake_api, store.model):
            assert request.usage is not None
            assert (
                request.usage["input_tokens"]
                + request.usage["cache_creation_input_tokens"]
                + request.usage["cache_read_input_tokens"]
                <= 2_000
            )
