"""Compaction under a backlog: bounded chunks, backoff, fallback, splits, crashes, reads.

The summarizer is Claude through the real SDK against the fake Messages API
(a second fake when it must fail on its own), or a custom one where a test
needs to count or crash.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import pytest
from sqlalchemy import event, insert, select

from convo import (
    ClaudeSummarizer,
    ContextTooLarge,
    Conversation,
    ExtractiveSummarizer,
    SummarizerFailed,
    _compaction,
)
from convo._models import ArchiveBlockRow, MessageRow, SearchTextRow, SummaryRow, utcnow
from convo._search import searchable_text
from convo._summarizer import SUMMARIZER_SYSTEM, SummaryResult, SummaryTurn
from convo._window import SummaryPart, summary_block
from tests.conftest import summarizing_reply
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI

pytestmark = pytest.mark.faces

SUMMARIZER_MODEL = "claude-haiku-5-5"
WORDS = "the tram to the harbour leaves at seven and the ferry at nine "


def _batches(rows: list[dict[str, Any]], size: int = 5_000) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def backlog(store: ConversationStore, conv: Conversation, count: int) -> None:
    """Append ``count`` turns (user first, alternating) in one transaction, with no
    window in between: checked and counted by the store as ``add`` does, written
    in bulk (the append path one row at a time would take minutes at 100,000)."""
    first = conv.message_count + 1
    turns = [
        store.turns.make_turn(
            "user" if (first + i) % 2 else "assistant",
            f"Turn {first + i}: " + WORDS * (1 + (first + i) % 3),
        )
        for i in range(count)
    ]
    now = utcnow()
    with store.database.transaction(write=True) as session:
        row = store.records.row(session, conv.id, lock=True)
        messages = [
            {
                "conversation_id": conv.id,
                "seq": row.last_seq + 1 + i,
                "role": turn.role,
                "content": turn.content,
                "token_count": turn.token_count,
                "status": "complete",
                "created_at": now,
            }
            for i, turn in enumerate(turns)
        ]
        for batch in _batches(messages):
            session.execute(insert(MessageRow), batch)
        search = [
            {"conversation_id": conv.id, "seq": m["seq"], "text": searchable_text(m["content"])}
            for m in messages
        ]
        for batch in _batches(search):
            session.execute(insert(SearchTextRow), batch)
        row.last_seq += count
        row.updated_at = now
    conv.refresh()


def _summarizer_requests(fake: FakeMessagesAPI) -> list[Any]:
    return [
        r
        for r in fake.requests
        if r.path == "/v1/messages"
        and isinstance(r.body, dict)
        and r.body.get("system") == SUMMARIZER_SYSTEM
    ]


def _chat_requests(fake: FakeMessagesAPI) -> list[Any]:
    return [
        r
        for r in fake.requests
        if r.path == "/v1/messages"
        and isinstance(r.body, dict)
        and r.body.get("system") != SUMMARIZER_SYSTEM
    ]


def _reported(usage: dict[str, int]) -> int:
    return (
        usage["input_tokens"]
        + usage["cache_creation_input_tokens"]
        + usage["cache_read_input_tokens"]
    )


def _covered(store: ConversationStore, conversation_id: str) -> list[tuple[int, int]]:
    with store.database.transaction() as session:
        return [
            (b.first_seq, b.last_seq)
            for b in session.execute(
                select(ArchiveBlockRow.first_seq, ArchiveBlockRow.last_seq)
                .where(ArchiveBlockRow.conversation_id == conversation_id)
                .order_by(ArchiveBlockRow.first_seq)
            )
        ]


def _summaries(store: ConversationStore, conversation_id: str) -> list[tuple[int, str]]:
    with store.database.transaction() as session:
        rows = session.execute(
            select(SummaryRow.through_seq, SummaryRow.summarizer)
            .where(SummaryRow.conversation_id == conversation_id)
            .order_by(SummaryRow.through_seq)
        )
        return [(through, kind) for through, kind in rows]


class Clock:
    """A fake clock for the summarizer's backoff."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(_compaction, "now", fake)
    return fake


@pytest.fixture
def summarizer_api() -> Iterator[FakeMessagesAPI]:
    """A second fake API, for the summarizer alone (so it can fail on its own)."""
    with FakeMessagesAPI(reply=summarizing_reply) as fake:
        yield fake


@pytest.fixture
def summarizer_client(summarizer_api: FakeMessagesAPI) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=summarizer_api.base_url, api_key="test-key", max_retries=0
    ) as client:
        yield client


# -- a 100,000-turn backlog ---------------------------------------------------------------


def test_a_100k_turn_backlog_compacts_in_bounded_steps(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    size = 100_000 if migrated_url.startswith("sqlite") else 20_000
    bound = 30_000
    with ConversationStore(
        migrated_url, client=api_client, token_budget=20_000, summarizer_input_tokens=bound
    ) as store:
        conv = store.create(system="You remember timetables.")
        backlog(store, conv, size - 1)
        conv.add("user", "When does the ferry leave?")
        # One window: at most one chunk summarized, the rest left out, a valid request.
        window = conv.window(max_tokens=300)
        assert len(_summarizer_requests(fake_api)) == 1
        assert any("not archived yet" in note for note in window.notes)
        assert window.omitted_seqs[0] == conv.refresh().archived_through_seq + 1
        assert window.estimated_tokens <= window.budget
        reply = api_client.messages.create(**window.params)
        conv.record(reply)
        assert _reported(_chat_requests(fake_api)[-1].usage) <= window.budget
        conv.add("user", "And the tram?")
        # The rest at once, in chunks, with progress.
        seen: list[tuple[int, int]] = []
        done = conv.compact(progress=lambda archived, total: seen.append((archived, total)))
        assert done is not None
        assert [a for a, _ in seen] == sorted(a for a, _ in seen)
        assert seen[-1][0] == seen[-1][1] == done.last_seq - done.first_seq + 1
        assert done.last_seq == conv.message_count - 1  # all but the newest exchange
        # Every summarizer request stayed under the bound (the fake counts cl100k x 1.2).
        calls = _summarizer_requests(fake_api)
        assert len(calls) >= 2 * size * 14 // bound // 3
        for call in calls:
            assert call.status == 200
            assert fake_api.count_request_tokens(call.body) <= bound * fake_api.token_ratio
        # The summaries cover every archived turn; blocks are capped and cover them too.
        blocks = _covered(store, conv.id)
        assert blocks[0][0] == 1
        assert blocks[-1][1] == done.last_seq
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(blocks))
        assert max(last - first + 1 for first, last in blocks) <= _compaction.MAX_BLOCK_TURNS
        summaries = _summaries(store, conv.id)
        assert summaries[-1][0] == done.last_seq
        assert {kind for _, kind in summaries} == {"claude"}
        params = conv.context(max_tokens=300)
        fake_api.check_request(params)
        assert [m["role"] for m in params["messages"]] == ["user"]
        summary = params["messages"][0]["content"][0]["text"]  # the summary opens the request
        assert f"turns 1-{done.last_seq} are archived" in summary
        history = conv.history()
        assert [m.seq for m in history] == list(range(1, size + 3))
        assert history[4].text.startswith("Turn 5: ")
        assert store.verify() == []


# -- a summarizer that is down --------------------------------------------------------------


def _exchange(conv: Conversation, client: anthropic.Anthropic, i: int) -> Any:
    conv.add("user", f"Question {i}: " + WORDS * (2 + i % 4))
    window = conv.window(max_tokens=200)
    conv.record(client.messages.create(**window.params))
    return window


def test_a_summarizer_down_for_an_hour_backs_off_then_falls_back(
    migrated_url: str,
    fake_api: FakeMessagesAPI,
    api_client: anthropic.Anthropic,
    summarizer_api: FakeMessagesAPI,
    summarizer_client: anthropic.Anthropic,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    summarizer_api.fail_next(529, times=10_000)  # overloaded, all hour long
    store = ConversationStore(
        migrated_url,
        client=api_client,
        token_budget=3_000,
        summarizer=ClaudeSummarizer(summarizer_client, model=SUMMARIZER_MODEL),
    )
    with store, caplog.at_level(logging.WARNING, logger="convo"):
        conv = store.create()
        notes: list[str] = []
        for i in range(60):  # one turn a minute for an hour
            notes.extend(_exchange(conv, api_client, i).notes)
            clock.advance(60)
        attempts = len(summarizer_api.requests)
        # Backoff (30 s, 1, 2, 4, 8, 10, 10 ... min): not on every turn.
        assert 6 <= attempts <= 12
        assert all(r.status == 529 for r in summarizer_api.requests)
        # Meanwhile the extractive summary stood in, and said so.
        kinds = {kind for _, kind in _summaries(store, conv.id)}
        assert kinds == {"extractive"}
        assert any("summarized by the fallback ExtractiveSummarizer" in n for n in notes)
        assert "summarized by the fallback" in caplog.text
        # Every request valid and within budget by the API's count.
        for request in _chat_requests(fake_api):
            assert request.status == 200
            assert _reported(request.usage) <= 3_000
        with store.database.transaction() as session:
            row = store.records.row(session, conv.id)
            assert row.compaction_failures == attempts
            assert row.compaction_retry_at is not None
        # The summarizer is back: at its next try Claude writes the summaries again.
        summarizer_api.reset()
        clock.advance(_compaction.RETRY_MAX_SECONDS)
        for i in range(60, 80):
            _exchange(conv, api_client, i)
        assert _summaries(store, conv.id)[-1][1] == "claude"
        assert conv.refresh().message_count == 160
        assert [m.seq for m in conv.history()] == list(range(1, 161))
        with store.database.transaction() as session:
            assert store.records.row(session, conv.id).compaction_failures == 0


class Down:
    """A summarizer that always fails."""

    def __init__(self) -> None:
        self.calls = 0

    def summarize(
        self, previous: str | None, turns: Sequence[SummaryTurn], *, target_tokens: int
    ) -> str:
        self.calls += 1
        raise RuntimeError("summarizer is down")


def _unmarked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value


def test_while_summaries_fail_requests_keep_a_stable_prefix(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic, clock: Clock
) -> None:
    down = Down()
    with ConversationStore(
        migrated_url, client=api_client, token_budget=3_000, summarizer=down
    ) as store:
        conv = store.create(system="You are a patient tutor. " * 20)
        windows = [_exchange(conv, api_client, i) for i in range(40)]
        assert down.calls == 1  # failed once, then waits for its backoff
        assert conv.refresh().archived_through_seq == 0
    requests = _chat_requests(fake_api)
    starts = [w.first_seq for w in windows]
    # The window drops to the low-water mark, then stays put for several turns.
    jumps = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    assert 1 <= jumps <= len(starts) // 4
    shared = 0
    for before, after in itertools.pairwise(requests):
        # Up to the previous request's newest message (which carries recalled turns).
        old = json.dumps(_unmarked(before.body["messages"][:-1]))
        new = json.dumps(_unmarked(after.body["messages"]))
        if new.startswith(old[:-1]):
            shared += 1
            assert after.usage is not None
            assert after.usage["cache_read_input_tokens"] > 0
    assert shared >= len(requests) * 3 // 4
    for request in requests:
        assert request.status == 200
        assert _reported(request.usage) <= 3_000


def test_prompt_too_long_splits_the_chunk(
    migrated_url: str,
    api_client: anthropic.Anthropic,
    summarizer_api: FakeMessagesAPI,
    summarizer_client: anthropic.Anthropic,
) -> None:
    summarizer_api.context_window = 30_000  # the summarizer model's window, in its tokens
    with ConversationStore(
        migrated_url,
        client=api_client,
        summarizer=ClaudeSummarizer(summarizer_client, model=SUMMARIZER_MODEL),
        summarizer_input_tokens=40_000,
    ) as store:
        conv = store.create()
        backlog(store, conv, 1_201)
        done = conv.compact()
        assert done is not None
        assert (done.first_seq, done.last_seq, done.summarizer) == (1, 1_200, "claude")
    calls = summarizer_api.requests
    too_long = [c for c in calls if c.status == 400]
    assert too_long
    assert all("prompt is too long" in json.dumps(c.response) for c in too_long)
    assert [c for c in calls if c.status == 200]
    assert all(c.status in (200, 400) for c in calls)
    with ConversationStore(migrated_url) as again:
        with again.database.transaction() as session:
            assert again.records.row(session, conv.id).compaction_failures == 0
        assert _summaries(again, conv.id)[-1] == (1_200, "claude")
        assert [m.seq for m in again.get(conv.id).history()] == list(range(1, 1_202))


class Crash(BaseException):
    """The process dying mid-call (not KeyboardInterrupt, which asyncio lets stop its loop)."""


class CrashAfter:
    """Summarizes ``chunks`` chunks, then the process dies (a BaseException)."""

    def __init__(self, chunks: int) -> None:
        self.left = chunks
        self.seen: list[int] = []

    def summarize(
        self, previous: str | None, turns: Sequence[SummaryTurn], *, target_tokens: int
    ) -> SummaryResult:
        if self.left == 0:
            raise Crash
        self.left -= 1
        self.seen.append(turns[-1].seq)
        return SummaryResult(f"{previous or ''} [turns {turns[0].seq}-{turns[-1].seq}]")


def test_a_crash_mid_compaction_keeps_the_committed_chunks(migrated_url: str) -> None:
    crash = CrashAfter(3)
    with ConversationStore(migrated_url, summarizer=crash, summarizer_input_tokens=5_000) as store:
        conv = store.create()
        backlog(store, conv, 3_001)
        with pytest.raises(Crash):
            conv.compact()
    assert len(crash.seen) == 3
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.get(conv.id)
        assert conv.archived_through_seq == crash.seen[-1]
        assert [through for through, _ in _summaries(store, conv.id)] == crash.seen
        assert _covered(store, conv.id)[-1][1] == crash.seen[-1]
        assert store.verify() == []
        assert [m.seq for m in conv.history()] == list(range(1, 3_002))
        done = conv.compact()  # carries on where it stopped
        assert done is not None
        assert (done.first_seq, done.last_seq) == (crash.seen[-1] + 1, 3_000)


def test_compact_raises_when_a_chunk_fails_and_keeps_what_was_done(
    migrated_url: str, clock: Clock
) -> None:
    with ConversationStore(migrated_url, summarizer=Down()) as store:
        conv = store.create()
        backlog(store, conv, 41)
        with pytest.raises(SummarizerFailed, match="stay live"):
            conv.compact()
        assert conv.refresh().archived_through_seq == 0


# -- window() reads what it can send ---------------------------------------------------------


def _statements(store: ConversationStore) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    @event.listens_for(store.database.engine, "before_cursor_execute")
    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        seen.append((statement, parameters))

    return seen


@pytest.mark.parametrize("compact", [False, True])
def test_window_reads_a_bounded_number_of_rows(migrated_url: str, compact: bool) -> None:
    counts = []
    for size in (301, 20_001):
        with ConversationStore(
            migrated_url,
            token_budget=4_000,
            summarizer=ExtractiveSummarizer(),
            summarizer_input_tokens=8_000,
        ) as store:
            conv = store.create()
            backlog(store, conv, size)
            conv.window(compact=compact)  # the first may archive a chunk
            seen = _statements(store)
            window = conv.window(compact=compact)
            assert window.estimated_tokens <= window.budget
            messages = [s for s, _ in seen if "FROM convo_messages" in s]
            # Every read of turns is bounded (a LIMIT, or the seq range of one chunk
            # being archived): nothing reads the whole backlog.
            assert messages
            assert all(
                "LIMIT" in s or "BETWEEN" in s for s in messages if s.lstrip().startswith("SELECT")
            )
            counts.append(len(seen))
    assert counts[0] == counts[1]


# -- the summary's size, and turns refused as too large ----------------------------------------


def test_the_summary_is_capped_and_never_crowds_out_the_conversation(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    budget = 2_500
    with ConversationStore(
        migrated_url, client=api_client, token_budget=budget, summarizer=ExtractiveSummarizer()
    ) as store:
        conv = store.create()
        for i in range(120):
            _exchange(conv, api_client, i)
        factor = store.calibration(store.model).effective_factor
        summary = conv.summary()
        assert summary is not None
        cap = _compaction.summary_target(int(budget / factor)) * _compaction.SUMMARY_SLACK
        tokens = store.turns.count_text(summary_block(SummaryPart(summary, 1, 0))["text"])
        assert tokens <= cap + 30  # the header
    for request in _chat_requests(fake_api):
        assert request.status == 200
        assert _reported(request.usage) <= budget


def _big_tool(i: int) -> dict[str, Any]:
    return {
        "name": f"tool_{i}",
        "description": "looks things up in the archive " * 20,
        "input_schema": {"type": "object"},
    }


def test_a_turn_refused_as_too_large_is_resent_not_dropped(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    contract = "CONTRACT clause: the tenant shall pay rent monthly. " * 155
    tools = [_big_tool(i) for i in range(20)]
    with ConversationStore(migrated_url, client=api_client, token_budget=3_500) as store:
        conv = store.create()
        for i in range(6):
            conv.send(f"Question {i}: " + WORDS * 5, max_tokens=200)
        with pytest.raises(ContextTooLarge, match="sent again with the next one"):
            conv.send(contract, max_tokens=200, tools=tools)
        sent_before = len(_chat_requests(fake_api))
        assert [m.status for m in conv.history()][-1] == "failed"
        conv.send("Please review it.", max_tokens=200)
        request = _chat_requests(fake_api)[sent_before]
        text = json.dumps(request.body["messages"][-1])
        assert "CONTRACT clause" in text
        assert "Please review it." in text


def test_a_failed_turn_that_cannot_go_with_the_next_is_left_out_loudly(
    migrated_url: str,
    fake_api: FakeMessagesAPI,
    api_client: anthropic.Anthropic,
    caplog: pytest.LogCaptureFixture,
) -> None:
    contract = "CONTRACT clause: the tenant shall pay rent monthly. " * 155
    with ConversationStore(migrated_url, client=api_client, token_budget=3_500) as store:
        conv = store.create()
        conv.send("Hello.", max_tokens=200)
        # The tools leave no room for it: refused before any call, kept as failed.
        with pytest.raises(ContextTooLarge):
            conv.send(contract, max_tokens=200, tools=[_big_tool(i) for i in range(20)])
        follow_up = "Now this instead: " + WORDS * 120  # cannot go with the contract
        with caplog.at_level(logging.WARNING, logger="convo"):
            conv.send(follow_up, max_tokens=200)
        window = conv._last_window
        assert window is not None
        failed_seq = next(m.seq for m in conv.history() if m.status == "failed")
        assert failed_seq in window.omitted_seqs
        assert any("whose call failed" in note for note in window.notes)
        assert "whose call failed" in caplog.text
        sent = json.dumps(_chat_requests(fake_api)[-1].body["messages"])
        assert "CONTRACT clause" not in sent
        assert "Now this instead" in sent
        assert conv.history()[failed_seq - 1].text == contract  # stored, not lost


def test_a_failed_user_turn_is_no_window_start_for_the_next() -> None:
    from convo._window import LiveTurn, safe_starts

    def turn(seq: int, role: str, status: str = "complete") -> LiveTurn:
        return LiveTurn(seq, role, [{"type": "text", "text": str(seq)}], 10, status)

    turns = [turn(1, "user"), turn(2, "assistant"), turn(3, "user", "failed"), turn(4, "user")]
    assert safe_starts(turns) == [0, 2]
    assert _compaction.after_failed_turns(turns) == 3
    assert safe_starts([*turns[:2], turn(3, "user"), turn(4, "user")]) == [0, 2, 3]


def test_convo_compact_works_through_a_backlog(migrated_url: str) -> None:
    from click.testing import CliRunner

    from convo._cli import cli

    with ConversationStore(migrated_url) as store:
        conv = store.create(token_budget=4_000)
        backlog(store, conv, 3_001)
    runner = CliRunner()
    shown = runner.invoke(cli, ["show", conv.id, "--context", "--db", migrated_url])
    assert shown.exit_code == 0, shown.output
    assert "left out to fit (stored, not sent): turns 1-" in shown.output
    done = runner.invoke(cli, ["compact", conv.id, "--offline", "--db", migrated_url])
    assert done.exit_code == 0, done.output
    assert "Archived turns 1-3,000" in done.output or "Archived turns 1-3000" in done.output
    with ConversationStore(migrated_url) as store:
        blocks = _covered(store, conv.id)
        assert len(blocks) >= 3_000 // _compaction.MAX_BLOCK_TURNS
        assert blocks[-1][1] == 3_000
        assert store.get(conv.id).window().omitted_seqs == ()
