"""A 100,000-turn backlog: bounded work per request, then compacted to the end.

100,000 turns are added with no ``window()`` in between (a long import, or a
summarizer that was down), then ``conv.window()`` is called once: it may
summarize one chunk (at most ``summarizer_input_tokens``), leaves the rest out
of the request, and its request must be valid and within budget. Then
``conv.compact()`` finishes the backlog chunk by chunk, and the p50 of 20
``window()`` calls is compared with the same figure for a 1,000-turn
conversation. Summaries are written by ``ClaudeSummarizer`` through the fake
Messages API of the test suite (no network), replies of a Claude summary's size.

    python bench/backlog.py [--quick] [--record]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import anthropic
from sqlalchemy import insert, select

from convo import ClaudeSummarizer, ConversationStore
from convo._models import ArchiveBlockRow, MessageRow, SearchTextRow, SummaryRow, utcnow
from convo._search import searchable_text
from convo._summarizer import SUMMARIZER_SYSTEM
from tests.fakeapi import FakeMessagesAPI, Reply

SIZE = 100_000
QUICK_SIZE = 10_000
BASE_SIZE = 1_000
CALLS = 20
RUNS = 5
INPUT_TOKENS = 60_000  # the default summarizer_input_tokens
TARGET_P50_MS = 5.0
TARGET_FLATNESS = 1.5


def reply(body: dict[str, Any]) -> Reply:
    if body.get("system") == SUMMARIZER_SYSTEM:
        prompt = body["messages"][-1]["content"]
        last = prompt.rsplit("(turn ", 1)[-1].split(")", 1)[0]
        return Reply(text=c.summary_text(int(last) if last.isdigit() else 0))
    return Reply(text="Noted.")


def add_backlog(store: ConversationStore, conversation_id: str, pool: c.TurnPool, n: int) -> None:
    """``n`` turns appended in bulk in one transaction, numbered and counted as ``add`` does."""
    extend = getattr(store.get(conversation_id), "extend", None)
    turns = [(pool.roles[i % len(pool)], pool.contents[i % len(pool)]) for i in range(n)]
    if turns[0][0] != "user":
        turns = turns[1:] + turns[:1]
    if extend is not None:  # conv.extend(), where this convo has it
        extend(turns)
        return
    now = utcnow()
    with store.database.transaction(write=True) as session:
        row = store.records.row(session, conversation_id, lock=True)
        rows = [
            {
                "conversation_id": conversation_id,
                "seq": row.last_seq + 1 + i,
                "role": role,
                "content": content,
                "token_count": store.turns.count(content),
                "status": "complete",
                "created_at": now,
            }
            for i, (role, content) in enumerate(turns)
        ]
        for start in range(0, len(rows), 5_000):
            batch = rows[start : start + 5_000]
            session.execute(insert(MessageRow), batch)
            session.execute(
                insert(SearchTextRow),
                [
                    {"conversation_id": conversation_id, "seq": r["seq"], "text": text}
                    for r in batch
                    if (text := searchable_text(r["content"]))
                ],
            )
        row.last_seq += len(rows)
        row.updated_at = now


def _within_budget(fake: FakeMessagesAPI, budget: int) -> bool:
    for request in fake.requests:
        if request.body.get("system") == SUMMARIZER_SYSTEM:
            continue
        if request.status != 200 or request.usage is None:
            return False
        used = (
            request.usage["input_tokens"]
            + request.usage["cache_creation_input_tokens"]
            + request.usage["cache_read_input_tokens"]
        )
        if used > budget:
            return False
    return True


def _coverage(store: ConversationStore, conversation_id: str, archived: int) -> bool:
    """Blocks cover turns 1..archived without gaps, and the latest summary covers them."""
    with store.database.transaction() as session:
        blocks = session.execute(
            select(ArchiveBlockRow.first_seq, ArchiveBlockRow.last_seq)
            .where(ArchiveBlockRow.conversation_id == conversation_id)
            .order_by(ArchiveBlockRow.first_seq)
        ).all()
        latest = session.scalar(
            select(SummaryRow.through_seq)
            .where(SummaryRow.conversation_id == conversation_id)
            .order_by(SummaryRow.through_seq.desc())
            .limit(1)
        )
    expected = 1
    for first, last in blocks:
        if first != expected:
            return False
        expected = last + 1
    return expected == archived + 1 and latest == archived


def run(url: str, size: int, pool: c.TurnPool, system: str) -> dict[str, Any]:
    with (
        FakeMessagesAPI(reply=reply) as fake,
        anthropic.Anthropic(base_url=fake.base_url, api_key="test-key", max_retries=0) as client,
    ):
        store = ConversationStore(
            url, client=client, token_budget=c.BUDGET, summarizer=ClaudeSummarizer(client)
        )
        with store:
            conv = store.create(system=system)
            started = time.perf_counter()
            add_backlog(store, conv.id, pool, size - 1)
            conv.add("user", "Where were we?")
            added = time.perf_counter() - started

            def summarizer_calls() -> list[Any]:
                return [r for r in fake.requests if r.body.get("system") == SUMMARIZER_SYSTEM]

            started = time.perf_counter()
            window = conv.window(max_tokens=1_024)
            first = time.perf_counter() - started
            first_chunks = len(summarizer_calls())
            fake.check_request(window.params)
            valid = window.estimated_tokens <= window.budget
            conv.record(client.messages.create(**window.params))
            conv.add("user", "Go on.")
            started = time.perf_counter()
            done = conv.compact()
            compact_s = time.perf_counter() - started
            calls = summarizer_calls()
            largest = max((fake.count_request_tokens(r.body) for r in calls), default=0)
            # p50 of 20 calls, median over RUNS runs (the machine may be shared).
            p50s = [
                c.percentile(c.timed(lambda: conv.window(max_tokens=1_024), CALLS, warmup=3), 50)
                for _ in range(RUNS)
            ]
            window = conv.window(max_tokens=1_024)
            fake.check_request(window.params)
            valid = valid and window.estimated_tokens <= window.budget and not window.omitted_seqs
            conv.record(client.messages.create(**window.params))
            archived = conv.refresh().archived_through_seq
            return {
                "added": added,
                "first_ms": first * 1000,
                "first_chunks": first_chunks,
                "compact_s": compact_s,
                "chunks": len(calls),
                "largest": largest / fake.token_ratio,  # back to cl100k, as the bound is
                "p50": c.median(p50s),
                "valid": valid and _within_budget(fake, window.budget),
                "covered": done is None or _coverage(store, conv.id, archived),
                "archived": archived,
            }


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    size = QUICK_SIZE if args.quick else SIZE
    pg = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    pool = c.turn_pool()
    system = c.system_prompt()
    rows = []
    verdicts = []
    for kind in c.database_kinds(pg):
        with c.fresh_database(kind, pg) as url:
            results = {}
            for n in (BASE_SIZE, size):
                print(f"{kind}: {n:,} turns", flush=True)
                results[n] = run(url, n, pool, system)
            base = results[BASE_SIZE]["p50"]
            for n, r in results.items():
                rows.append(
                    [
                        kind,
                        f"{n:,}",
                        f"{r['added']:.1f}",
                        f"{r['first_ms']:,.0f}",
                        r["first_chunks"],
                        f"{r['compact_s']:.1f}",
                        r["chunks"],
                        f"{r['largest']:,.0f}",
                        c.fmt_ms(r["p50"]),
                        f"{r['p50'] / base:.2f}x",
                        "yes" if r["valid"] else "NO",
                        "yes" if r["covered"] else "NO",
                    ]
                )
            big = results[size]
            p50 = big["p50"] * 1000
            flat = big["p50"] / base
            verdicts.append(
                f"- {kind}: window() p50 after the backlog {p50:.2f} ms, target <= "
                f"{TARGET_P50_MS:g} ms: **{'met' if p50 <= TARGET_P50_MS else 'MISSED'}**; "
                f"{flat:.2f}x the {BASE_SIZE:,}-turn figure, target <= {TARGET_FLATNESS}x: "
                f"**{'met' if flat <= TARGET_FLATNESS else 'MISSED'}**."
            )
    headers = [
        "database",
        "turns",
        "add s",
        "first window() ms",
        "chunks in it",
        "compact() s",
        "summarizer requests",
        "largest summarizer input (tokens)",
        "window() p50 ms after",
        "vs 1,000",
        "requests valid, in budget",
        "summaries cover archive",
    ]
    result_table = c.table(headers, rows)
    print()
    print(result_table)
    print()
    print("\n".join(verdicts))
    if args.record:
        body = [
            f"Budget {c.BUDGET:,} tokens, system prompt ~2,000 tokens, "
            f"`summarizer_input_tokens` {INPUT_TOKENS:,} (the default). The backlog is "
            "added in one transaction with no `window()` in between; the first `window()` "
            "summarizes at most one chunk and leaves the rest out of its request; "
            "`compact()` then archives the rest, one summarizer request (`ClaudeSummarizer`, "
            "through the test suite's fake API) per chunk. *largest summarizer input* is the "
            "biggest summarizer request, in cl100k tokens. *window() p50 after* is the p50 of "
            f"{CALLS} calls once the backlog is archived, median of {RUNS} runs. "
            "*requests valid, in budget*: every conversation request passed the fake's "
            "validator and its reported input "
            "was within the budget. *summaries cover archive*: archive blocks cover turns 1 "
            "to the last archived one without gaps, and the latest summary covers them all.",
            "",
            result_table,
            "",
            "Targets:",
            "",
            *verdicts,
        ]
        c.record("backlog", "\n".join(body), postgres_url=pg, command=c.command_line())


if __name__ == "__main__":
    main()
