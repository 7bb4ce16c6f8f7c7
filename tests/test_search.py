"""Full-text search over every turn, archived ones included, with the database's own index."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from convo import ConversationNotFound, ConversationStore, ExtractiveSummarizer, InvalidInput
from convo._cli import cli


@pytest.fixture
def filled(migrated_url: str) -> tuple[str, str, str]:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        travel = store.create(title="travel")
        travel.add("user", "Which trams go to Belém in Lisbon?")
        travel.add("assistant", "Tram 15 goes from Praça da Figueira to Belém.")
        travel.add(
            "assistant",
            [{"type": "tool_use", "id": "t1", "name": "timetable", "input": {"line": "tram15"}}],
        )
        travel.add(
            "user", [{"type": "tool_result", "tool_use_id": "t1", "content": "every 12 minutes"}]
        )
        travel.add("user", "And the refund policy for lost tickets?")
        assert travel.compact() is not None  # the tram turns are archived now
        other = store.create()
        other.add("user", "Our refund policy: 30 days, no questions asked.")
        return migrated_url, travel.id, other.id


def test_search_finds_archived_and_live_turns_newest_first(filled: tuple[str, str, str]) -> None:
    url, travel, other = filled
    with ConversationStore(url) as store:
        hits = store.search("refund policy")
        assert [(h.conversation_id, h.seq) for h in hits] == [(other, 1), (travel, 5)]
        archived = store.search("TRAM belém")  # any case; archived turns too
        assert [(h.conversation_id, h.seq) for h in archived] == [(travel, 2)]
        assert "[" in archived[0].snippet
        assert [(h.seq, h.role) for h in store.search("lisbon")] == [(1, "user")]
        assert [h.seq for h in store.search("minutes")] == [4]  # tool results are searchable
        assert [h.seq for h in store.search("timetable")] == [3]  # and tool calls
        assert store.search("refund", conversation_id=travel)[0].seq == 5
        assert store.search("submarine") == []
        with pytest.raises(InvalidInput, match="query"):
            store.search("  ?! ")
        with pytest.raises(ConversationNotFound):
            store.search("refund", conversation_id="conv_nothere")


def test_search_survives_quotes_and_operators(filled: tuple[str, str, str]) -> None:
    url, _, other = filled
    with ConversationStore(url) as store:
        for query in ('"refund', "refund* -policy", "(questions", "asked)", "policy:"):
            assert other in {h.conversation_id for h in store.search(query)}


def test_deleting_a_conversation_removes_it_from_search(filled: tuple[str, str, str]) -> None:
    url, travel, other = filled
    with ConversationStore(url) as store:
        store.delete(other)
        assert [h.conversation_id for h in store.search("refund")] == [travel]


def test_convo_search_command(filled: tuple[str, str, str]) -> None:
    url, _, other = filled
    result = CliRunner().invoke(cli, ["search", "refund", "--db", url])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{other} #1 user ")
    assert "[refund]" in lines[0].lower()
    result = CliRunner().invoke(cli, ["search", "refund", "--json", "--limit", "1", "--db", url])
    assert [h["conversation_id"] for h in json.loads(result.stdout)] == [other]
    result = CliRunner().invoke(cli, ["search", "zeppelin", "--db", url])
    assert (result.exit_code, result.stderr.strip()) == (0, "no matches")
