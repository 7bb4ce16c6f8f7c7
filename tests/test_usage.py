"""store.usage() and `convo stats`: requests, tokens by kind, cache hits, cost, errors, latency."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import anthropic
import pytest
from click.testing import CliRunner

from convo import APIError, PriceTable
from convo._cli import cli
from convo._usage import CallRecord, summarize
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI

pytestmark = pytest.mark.faces

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def _usage(inp: int, out: int, write: int = 0, read: int = 0) -> dict[str, int]:
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
    }


def test_summarize_totals_costs_and_percentiles() -> None:
    records = [
        CallRecord("c1", "claude-sonnet-4-6", NOW, _usage(1_000_000, 0), 100),
        CallRecord("c1", "claude-sonnet-4-6", NOW, _usage(0, 1_000_000, read=1_000_000), 300),
        CallRecord("c2", "claude-haiku-4-5", NOW + timedelta(days=1), _usage(0, 0, 1_000_000), 200),
        CallRecord("c2", None, NOW, None, None, failed=True),
    ]
    report = summarize(records, PriceTable(), group_by="conversation")
    total = report.total
    assert (total.requests, total.errors) == (3, 1)
    # sonnet-4-6: $3 in + $15 out + $0.30 read; haiku-4-5: $1.25 cache write
    assert total.cost_usd == Decimal("19.55")
    assert total.cache_hit_ratio == pytest.approx(1 / 3)
    assert (total.latency_p50_ms, total.latency_p95_ms) == (200, 300)
    assert [g.key for g in report.groups] == ["c1", "c2"]
    assert report.groups[1].errors == 1
    by_day = summarize(records, PriceTable(), group_by="day")
    assert [g.key for g in by_day.groups] == ["2026-11-23", "2026-11-24"]


def test_an_unknown_model_costs_none_not_a_guess() -> None:
    records = [
        CallRecord("c", "claude-sonnet-4-6", NOW, _usage(10, 10), 1),
        CallRecord("c", "some-new-model", NOW, _usage(10, 10), 1),
    ]
    report = summarize(records, PriceTable(), group_by="model")
    assert report.total.cost_usd is None
    assert report.total.unpriced_requests == 1
    priced, unpriced = report.groups  # sorted by model name
    assert (priced.key, unpriced.key) == ("claude-sonnet-4-6", "some-new-model")
    assert priced.cost_usd == Decimal("0.00018")
    assert unpriced.cost_usd is None


def test_store_usage_counts_replies_failures_and_summaries(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(
        migrated_url, client=api_client, max_retries=0, token_budget=100_000
    ) as store:
        first = store.create(user_id="alice")
        first.send("hello")
        first.send("again")
        fake_api.fail_next(500)
        with pytest.raises(APIError):
            first.send("fails")
        second = store.create(user_id="bob", model="claude-haiku-4-5")
        second.send("hi")
        first.send("more")
        assert first.compact() is not None
        report = store.usage(group_by="model")
        requests = [r for r in fake_api.requests if r.status == 200]
        assert report.total.requests == len(requests)
        assert report.total.errors == 1
        assert report.total.output_tokens == sum(r.usage["output_tokens"] for r in requests)
        models = {g.key: g.requests for g in report.groups}
        assert models["claude-haiku-4-5"] == 1
        assert models["claude-haiku-5-5"] == 1  # the summary
        alice = store.usage(user_id="alice")
        assert (alice.total.requests, alice.total.errors) == (report.total.requests - 1, 1)
        one = store.usage(conversation_id=second.id)
        assert one.total.requests == 1
        assert one.total.cost_usd is not None
        assert one.total.cost_usd > 0
        assert store.usage(since=datetime.now(UTC) + timedelta(hours=1)).total.requests == 0


def test_convo_stats_command(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client) as store:
        conv = store.create()
        conv.send("hello")
        conv.send("hello again")
    runner = CliRunner()
    result = runner.invoke(cli, ["stats", "--db", migrated_url, "--by", "day"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["requests", "errors"]
    assert lines[-1].startswith("total")
    assert lines[-1].split()[1:3] == ["2", "0"]
    result = runner.invoke(cli, ["stats", conv.id, "--json", "--db", migrated_url])
    data = json.loads(result.stdout)
    assert data["total"]["requests"] == 2
    assert data["total"]["cache_read_input_tokens"] == sum(
        r.usage["cache_read_input_tokens"] for r in fake_api.requests if r.usage
    )
    assert Decimal(data["total"]["cost_usd"]) > 0
    result = runner.invoke(cli, ["stats", "conv_missing", "--db", migrated_url])
    assert result.exit_code == 1
    assert "conversation not found" in result.stderr
