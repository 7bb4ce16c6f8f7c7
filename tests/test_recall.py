"""Ranked recall: store.recall/conv.recall, recalled turns in the request, the CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, text

from convo import (
    ConversationNotFound,
    ExtractiveSummarizer,
    InvalidInput,
    RecallHit,
)
from convo._cli import cli
from convo._models import MessageRow
from convo._recall import MAX_QUERY_TERMS, RECALL_HEADER, query_terms
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI

pytestmark = pytest.mark.faces

FACTS = [
    ("user", "My sister Margaret moved to Porto last spring and adopted two greyhounds."),
    ("assistant", "Lovely! Greyhounds are gentle dogs, and Porto has good parks for them."),
    ("user", "In Lisbon the trams were slow; the number 28 was packed with tourists."),
    ("assistant", "Tram 28 is famous and crowded: ride it early in the morning."),
    ("user", "Note for later: my passport expires in March 2027."),
    ("assistant", "Noted, your passport expiry date is March 2027."),
    ("user", "What should I cook tonight? Something with lentils."),
    ("assistant", "A red lentil dal with cumin and garlic is quick."),
]


def _fill(store: ConversationStore, **create: Any) -> str:
    conv = store.create(**create)
    for role, said in FACTS:
        conv.add(role, said)
    conv.add("user", "Thanks, that sounds good.")
    assert conv.compact() is not None  # turns 1-8 are archived now
    return conv.id


@pytest.fixture
def filled(migrated_url: str) -> tuple[str, str]:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        return migrated_url, _fill(store)


def test_recall_ranks_by_relevance_any_word_and_stems(filled: tuple[str, str]) -> None:
    url, conv_id = filled
    with ConversationStore(url) as store:
        hits = store.recall("Which dog breed did my sister adopt?")
        assert hits[0].seq == 1
        assert isinstance(hits[0], RecallHit)
        assert (hits[0].conversation_id, hits[0].role) == (conv_id, "user")
        assert hits[0].created_at.tzinfo is not None
        assert "[" in hits[0].snippet
        assert "Margaret" in hits[0].text
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        # A stem finds its other forms: "trams" finds "Tram 28", "expiring" finds "expires".
        assert 4 in {h.seq for h in store.recall("trams")}
        assert {h.seq for h in store.recall("expiring passports")} == {5, 6}
        # Any word: one query reaches two topics.
        seqs = {h.seq for h in store.recall("greyhounds lentils")}
        assert {1, 7} <= seqs
        assert [h.seq for h in store.recall("lentils", k=1)] in ([7], [8])
        assert store.recall("zeppelin submarine") == []
        store.get(conv_id).add("assistant", "Margaret's greyhounds are called Tosca and Nabucco.")
        # Live turns too, and conv.recall keeps to its conversation.
        assert 10 in {h.seq for h in store.get(conv_id).recall("greyhounds names")}
        with pytest.raises(ConversationNotFound):
            store.recall("greyhounds", conversation_id="conv_nothere")


def test_recall_bad_input(filled: tuple[str, str]) -> None:
    url, conv_id = filled
    with ConversationStore(url) as store:
        # No word at all: a clear error. Stop words only: nothing to look for.
        for query in ("", "   ", "?! …"):
            with pytest.raises(InvalidInput, match="query"):
                store.recall(query)
        assert store.recall("what is it that you would have been") == []
        with pytest.raises(InvalidInput, match="query"):
            store.recall(42)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="k"):
            store.recall("passport", k=0)
        # Query syntax and SQL in the text are only ever words.
        hostile = [
            '"passport',
            "passport* OR -lentils",
            "NEAR(passport lentils)",
            "passport'; DROP TABLE convo_messages; --",
            "passport:* & !(lentils) | <->",
            "passport\\ AND \\' OR 1=1",
            "passport) OR (1=1",
        ]
        for query in hostile:
            assert 5 in {h.seq for h in store.recall(query)}, query
        with store.database.transaction() as session:
            assert session.scalar(select(func.count()).select_from(MessageRow)) == 9
        # A huge query is cut: its first words still count, the rest is ignored.
        huge = "passport expiry " + " ".join(f"filler{i}" for i in range(200_000))
        assert len(query_terms(huge)) <= MAX_QUERY_TERMS
        assert {h.seq for h in store.recall(huge)} >= {5}
        assert store.get(conv_id).recall("lentils")[0].seq in {7, 8}


def test_recall_by_user_never_crosses_users(migrated_url: str) -> None:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        alice = _fill(store, user_id="alice")
        bob = store.create(user_id="bob")
        bob.add("user", "My passport number is BOB-123 and my greyhounds are Rex and Max.")
        alice_other = store.create(user_id="alice")
        alice_other.add("user", "I lost my passport at the airport in Porto.")
        hits = store.recall("passport greyhounds", user_id="alice")
        assert {h.conversation_id for h in hits} == {alice, alice_other.id}
        assert {h.conversation_id for h in store.recall("passport", user_id="bob")} == {bob.id}
        assert store.recall("passport", user_id="carol") == []
        both = store.recall("passport", user_id="alice", conversation_id=alice_other.id)
        assert [h.conversation_id for h in both] == [alice_other.id]


def _last_user_blocks(params: dict[str, Any]) -> list[dict[str, Any]]:
    last = params["messages"][-1]
    assert last["role"] == "user"
    blocks: list[dict[str, Any]] = last["content"]
    return blocks


def test_window_recalls_archived_turns_after_the_last_breakpoint(
    filled: tuple[str, str],
) -> None:
    url, conv_id = filled
    with ConversationStore(url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.get(conv_id)
        conv.add("assistant", "Enjoy!")
        conv.add("user", "Remind me, which dog breed did my sister adopt when she moved?")
        window = conv.window()
        assert window.first_seq == 9  # turns 1-8 are archived: only recall can bring them
        assert window.recalled
        assert window.recalled[0].seq == 1
        assert all(h.seq < 9 for h in window.recalled)
        blocks = _last_user_blocks(window.params)
        recall_block = blocks[-1]
        assert recall_block["type"] == "text"
        assert "cache_control" not in recall_block
        assert recall_block["text"].startswith(RECALL_HEADER)
        assert "[turn 1, user, " in recall_block["text"]
        assert "greyhounds" in recall_block["text"]
        # Every breakpoint comes before it: the cached prefix does not include it.
        assert "cache_control" in blocks[-2]
        assert window.recall_tokens == store.turns.count_text(recall_block["text"])
        assert 0 < window.recall_tokens <= window.budget * store.recall_share
        assert window.raw_tokens == (
            window.system_tokens
            + window.summary_tokens
            + window.message_tokens
            + window.extra_tokens
            + window.recall_tokens
        )
        assert window.estimated_tokens <= window.budget
        # A question about nothing stored recalls nothing; an assistant turn last, neither.
        conv.add("assistant", "Greyhounds.")
        assert conv.window().recalled == ()
        conv.add("user", "And what about quantum chromodynamics?")
        plain = conv.window()
        assert plain.recalled == ()
        assert plain.recall_tokens == 0
        assert not any(
            b.get("text", "").startswith(RECALL_HEADER) for b in _last_user_blocks(plain.params)
        )
    with ConversationStore(url, recall=False) as store:
        conv = store.get(conv_id)
        conv.add("assistant", "No idea.")
        conv.add("user", "Which dog breed did my sister adopt?")
        off = conv.window()
        assert off.recalled == ()
        assert off.recall_tokens == 0


def test_recall_allowance_is_part_of_the_budget(migrated_url: str) -> None:
    with ConversationStore(
        migrated_url, summarizer=ExtractiveSummarizer(), token_budget=8_000, recall_share=0.05
    ) as store:
        conv = store.create()
        for index in range(120):
            conv.add("user", f"Fact {index}: the greyhound kennel number {index} is painted blue.")
            conv.add("assistant", f"Noted fact {index} about greyhound kennel {index} " * 5)
        conv.add("user", "Which greyhound kennel is painted blue?")
        window = conv.window()
        assert conv.archived_through_seq > 0
        assert window.recalled  # many hits, cut to the allowance
        assert window.recall_tokens <= 8_000 * 0.05
        assert window.estimated_tokens <= window.budget
        # Hits already in the request are not recalled again.
        assert all(h.seq < (window.first_seq or 0) for h in window.recalled)


def test_user_scope_recalls_own_conversations_only(migrated_url: str) -> None:
    with ConversationStore(
        migrated_url, summarizer=ExtractiveSummarizer(), recall_scope="user"
    ) as store:
        bob = store.create(user_id="bob")
        bob.add("user", "Bob's secret: my greyhound kennel code is 4471.")
        old = store.create(user_id="alice")
        old.add("user", "My greyhound kennel code is 9902, remember it.")
        conv = store.create(user_id="alice")
        conv.add("user", "What is my greyhound kennel code?")
        window = conv.window()
        recalled = window.params["messages"][-1]["content"][-1]["text"]
        assert [h.conversation_id for h in window.recalled] == [old.id]
        assert f"[conversation {old.id}, turn 1, user" in recalled
        assert "9902" in recalled
        assert "4471" not in recalled
        loner = store.create()  # no user_id: nothing beyond its own conversation
        loner.add("user", "What is my greyhound kennel code?")
        assert loner.window().recalled == ()
    with pytest.raises(InvalidInput, match="recall_scope"):
        ConversationStore(migrated_url, recall_scope="everyone")
    for share in (0.9, 0, "0.1", None):
        with pytest.raises(InvalidInput, match="recall_share"):
            ConversationStore(migrated_url, recall_share=share)  # type: ignore[arg-type]


@pytest.fixture
def sending_store(
    migrated_url: str, api_client: anthropic.Anthropic
) -> Iterator[ConversationStore]:
    with ConversationStore(
        migrated_url, client=api_client, summarizer=ExtractiveSummarizer()
    ) as opened:
        yield opened


def _bodies(fake: FakeMessagesAPI) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if r.path == "/v1/messages" and r.body is not None]


def test_send_with_recall_keeps_the_cached_prefix(
    sending_store: ConversationStore, fake_api: FakeMessagesAPI
) -> None:
    store = sending_store
    conv = store.create(system="You are a helpful travel assistant. " * 100)
    for role, said in FACTS:
        conv.add(role, said)
    conv.add("user", "Thanks.")
    conv.compact()
    conv.send("Which dog breed did my sister adopt in Porto?")
    conv.send("And when does my passport expire, remind me?")
    first, second = _bodies(fake_api)[-2:]
    for body, seq in ((first, 1), (second, 5)):
        last = body["messages"][-1]["content"][-1]
        assert last["text"].startswith(RECALL_HEADER)
        assert f"[turn {seq}, user," in last["text"]
    # The second request repeats the first up to the first's recall block, byte for byte.
    stripped = [
        {
            **m,
            "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]],
        }
        for m in first["messages"]
    ]
    stripped[-1]["content"] = stripped[-1]["content"][:-1]
    again = [
        {
            **m,
            "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]],
        }
        for m in second["messages"][: len(stripped)]
    ]
    assert again == stripped
    usage = [r.usage for r in fake_api.requests if r.usage is not None][-1]
    assert usage["cache_read_input_tokens"] > 0


def _break_recall(url: str, store: ConversationStore) -> None:
    with store.database.transaction() as session:
        if session.get_bind().dialect.name == "sqlite":
            # The stemmed index is gone (a half-restored backup): appends still work.
            session.execute(text("DROP TRIGGER convo_search_fts_stem_insert"))
            session.execute(text("DROP TRIGGER convo_search_fts_stem_delete"))
            session.execute(text("DROP TABLE convo_search_fts_stem"))
        elif session.get_bind().dialect.name == "postgresql":
            pytest.skip("PostgreSQL ranks without its index; nothing short of the table breaks")
        else:
            session.execute(text("DROP INDEX convo_search_fts_index ON convo_search"))


def test_a_recall_failure_never_fails_a_send(
    sending_store: ConversationStore,
    fake_api: FakeMessagesAPI,
    migrated_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    conv = sending_store.create()
    for role, said in FACTS:
        conv.add(role, said)
    conv.add("user", "Thanks.")
    conv.compact()
    _break_recall(migrated_url, sending_store)
    with caplog.at_level(logging.WARNING, logger="convo"):
        reply = conv.send("Which dog breed did my sister adopt?")
    assert reply.role == "assistant"
    assert reply.status == "complete"
    assert "recall failed" in caplog.text
    last = _bodies(fake_api)[-1]["messages"][-1]["content"]
    assert not any(b.get("text", "").startswith(RECALL_HEADER) for b in last)
    assert conv.window().recalled == ()


def test_convo_recall_command(filled: tuple[str, str]) -> None:
    url, conv_id = filled
    result = CliRunner().invoke(cli, ["recall", "sister adopted dogs", "--db", url])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"{conv_id} #1 user ")
    result = CliRunner().invoke(cli, ["recall", "passport", "-k", "1", "--json", "--db", url])
    (hit,) = json.loads(result.stdout)
    assert (hit["seq"], hit["conversation_id"]) in {(5, conv_id), (6, conv_id)}
    assert set(hit) == {"conversation_id", "seq", "role", "created_at", "score", "snippet"}
    result = CliRunner().invoke(cli, ["recall", "passport", "--user", "nobody", "--db", url])
    assert (result.exit_code, result.stderr.strip()) == (0, "no matches")
    result = CliRunner().invoke(cli, ["recall", "?!", "--db", url])
    assert result.exit_code != 0
    assert "query" in result.stderr


def test_show_context_lists_recalled_turns(filled: tuple[str, str]) -> None:
    url, conv_id = filled
    with ConversationStore(url) as store:
        conv = store.get(conv_id)
        conv.add("assistant", "Enjoy!")
        conv.add("user", "Where did my sister Margaret move to?")
    result = CliRunner().invoke(cli, ["show", conv_id, "--context", "--db", url])
    assert result.exit_code == 0, result.output
    assert "recalled earlier turns" in result.stdout
    assert f"{conv_id} #1 user " in result.stdout
    result = CliRunner().invoke(cli, ["show", conv_id, "--context", "--json", "--db", url])
    shown = json.loads(result.stdout)
    assert shown["recalled"][0]["seq"] == 1
    assert shown["recall_tokens"] > 0


class _DownSummarizer:
    """A summarizer that is down (every call fails, as during an outage)."""

    def summarize(self, previous: object, turns: object, *, target_tokens: int) -> object:
        raise ConnectionError("summarizer unreachable")


def test_turns_left_out_while_compaction_fails_are_recalled(migrated_url: str) -> None:
    with ConversationStore(migrated_url, summarizer=_DownSummarizer(), token_budget=6_000) as store:
        conv = store.create()
        conv.add("user", "My locker combination at the climbing gym is 4-19-27.")
        conv.add("assistant", "Got it.")
        for index in range(60):
            conv.add("user", f"Question {index} about the weather in the mountains today.")
            conv.add("assistant", f"Answer {index}: cloudy with some sun. " * 12)
        conv.add("user", "What is my climbing gym locker combination?")
        window = conv.window()
        assert conv.archived_through_seq == 0  # the summarizer is down: nothing archived
        assert 1 in window.omitted_seqs
        assert [h.seq for h in window.recalled] == [1]
        assert "4-19-27" in window.params["messages"][-1]["content"][-1]["text"]
        assert window.estimated_tokens <= window.budget


def test_select_cuts_long_turns_and_orders_by_date() -> None:
    from datetime import UTC, datetime, timedelta

    from convo import TiktokenCounter
    from convo._recall import MAX_HIT_TOKENS, RecallQuery, select

    counter = TiktokenCounter()
    day = datetime(2026, 11, 1, tzinfo=UTC)
    long = "greyhound kennel " + "blue paint everywhere " * 400
    hits = [
        RecallHit("conv_a", 30, "assistant", day + timedelta(days=3), 9.0, "", long),
        RecallHit("conv_a", 4, "user", day, 8.0, "", "my greyhound kennel is blue"),
        RecallHit("conv_a", 6, "user", day, 1.0, "", "greyhound kennel, barely relevant"),
        RecallHit("conv_a", 8, "user", day, 8.5, "", "greyhound only"),
        RecallHit("conv_a", 50, "user", day, 9.5, "", "greyhound kennel, in the request"),
    ]
    query = RecallQuery(("greyhound", "kennel"), "conv_a", None, "conv_a", 40, 2_000)
    chosen, block, tokens = select(hits, query, first_seq=40, count_text=counter.count)
    # In the request already (50), under the score threshold (6), too few stems (8): out.
    assert [h.seq for h in chosen] == [30, 4]
    lines = block.split("\n\n")
    assert lines[0] == RECALL_HEADER
    assert lines[1].startswith("[turn 4, user, 2026-11-01] my greyhound")  # said first
    assert lines[2].startswith("[turn 30, assistant, 2026-11-04] greyhound kennel blue")
    assert lines[2].endswith("…")
    assert counter.count(lines[2]) <= MAX_HIT_TOKENS
    assert tokens == counter.count(block) <= query.allowance
    other = RecallHit("conv_b", 2, "user", day, 9.9, "", "greyhound kennel at home")
    _, block, _ = select([other], query, first_seq=40, count_text=counter.count)
    assert "[conversation conv_b, turn 2, user, 2026-11-01]" in block


def test_rarest_terms_bound_what_a_lookup_ranks() -> None:
    from convo._recall import MAX_CANDIDATES, rarest_terms

    cap = MAX_CANDIDATES + 1
    assert rarest_terms(["tram", "lisbon", "city"], [12, 3, 40]) == ["tram", "lisbon", "city"]
    # The commonest go first once the matches would pass the bound; order is kept.
    assert rarest_terms(["the", "tram", "city"], [cap, 40, MAX_CANDIDATES - 10]) == ["tram"]
    # Words matching nothing are dropped; the rarest one that matches always stays.
    assert rarest_terms(["zzz", "python", "code"], [0, cap, cap]) == ["python"]
    assert rarest_terms(["zzz"], [0]) == []
