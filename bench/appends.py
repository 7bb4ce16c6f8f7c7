"""How many turns per second convo stores: one writer, and 8 writer processes.

Every append is a real ``conv.add(role, text)``: the turn is checked and
counted (cl100k), checked against the budget, and appended in its own
transaction under the conversation's lock (``BEGIN IMMEDIATE`` on SQLite,
``SELECT ... FOR UPDATE`` on PostgreSQL), numbered ``last_seq + 1``.

* one writer: one process appending to one conversation;
* 8 writers, one conversation: 8 processes appending to the same conversation
  at once (they queue on its lock);
* 8 writers, 8 conversations: 8 processes, each appending to its own.

Processes start, open their store and load the tokenizer first, then wait at
a barrier; the clock runs from the barrier to the last writer's last commit.
After each run the turns are checked: every one stored once, seq gap-free.
Figures are medians over the runs. The machine has the cores it has: 8
writers on 2 cores also compete for CPU, not only for locks.

    python bench/appends.py [--quick] [--record] [--runs N]
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from convo import ConversationStore

WRITERS = 8


def _writer(
    url: str,
    conversation_id: str,
    texts: list[str],
    barrier: Any,
    results: Any,
) -> None:
    with ConversationStore(url) as store:
        conv = store.get(conversation_id)
        store.turns.count_text("warm up the tokenizer")
        conv.refresh()
        barrier.wait()
        started = time.monotonic()
        for i, text in enumerate(texts):
            conv.add("user" if i % 2 == 0 else "assistant", text)
        results.put((started, time.monotonic(), len(texts)))


def _check(store: ConversationStore, conversation_id: str, expected: int) -> None:
    seqs = [m.seq for m in store.get(conversation_id).iter_history()]
    if seqs != list(range(1, expected + 1)):
        raise AssertionError(f"{conversation_id}: {len(seqs)} turns, expected 1..{expected}")


def concurrent(url: str, texts: list[str], per_writer: int, *, shared: bool) -> float:
    """Messages per second of 8 writer processes (one shared conversation or one each)."""
    ctx = mp.get_context("spawn")
    with ConversationStore(url) as store:
        if shared:
            ids = [store.create(title="shared").id] * WRITERS
        else:
            ids = [store.create(title=f"writer {i}").id for i in range(WRITERS)]
        barrier = ctx.Barrier(WRITERS)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_writer,
                args=(
                    url,
                    ids[i],
                    texts[i * per_writer : (i + 1) * per_writer],
                    barrier,
                    results,
                ),
            )
            for i in range(WRITERS)
        ]
        for proc in procs:
            proc.start()
        got = [results.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
            if proc.exitcode != 0:
                raise RuntimeError(f"a writer process failed (exit code {proc.exitcode})")
        total = sum(n for _, _, n in got)
        elapsed = max(end for _, end, _ in got) - min(start for start, _, _ in got)
        for conversation_id in sorted(set(ids)):
            _check(store, conversation_id, per_writer * ids.count(conversation_id))
    return total / elapsed


def round_trips(url: str, texts: list[str]) -> tuple[float, float]:
    """Transactions and SQL statements per ``conv.add()``, averaged over ``texts``."""
    from sqlalchemy import event

    with ConversationStore(url) as store:
        conv = store.create(title="round trips")
        conv.add("user", "warm-up")
        counts = {"begin": 0, "statements": 0}

        def on_begin(*_: Any) -> None:
            counts["begin"] += 1

        def on_statement(*_: Any) -> None:
            counts["statements"] += 1

        engine = store.database.engine
        event.listen(engine, "begin", on_begin)
        event.listen(engine, "before_cursor_execute", on_statement)
        for i, text in enumerate(texts):
            conv.add("assistant" if i % 2 == 0 else "user", text)
        event.remove(engine, "begin", on_begin)
        event.remove(engine, "before_cursor_execute", on_statement)
    return counts["begin"] / len(texts), counts["statements"] / len(texts)


def single(url: str, texts: list[str]) -> tuple[float, float]:
    """Messages per second of one writer, and its p50 ms per append."""
    with ConversationStore(url) as store:
        conv = store.create(title="single writer")
        conv.add("user", "warm-up")
        samples = []
        started = time.perf_counter()
        for i, text in enumerate(texts):
            t0 = time.perf_counter()
            conv.add("assistant" if i % 2 == 0 else "user", text)
            samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        _check(store, conv.id, len(texts) + 1)
    return len(texts) / elapsed, c.median(samples)


def _postgres_settings(url: str | None) -> str:
    if url is None:
        return ""
    from sqlalchemy import create_engine, text

    from convo._database import resolve_url

    engine = create_engine(resolve_url(url))
    try:
        with engine.connect() as connection:
            values = {
                name: connection.execute(text(f"SHOW {name}")).scalar()
                for name in ("synchronous_commit", "fsync", "wal_sync_method")
            }
    finally:
        engine.dispose()
    return "PostgreSQL runs with " + ", ".join(f"`{k} = {v}`" for k, v in values.items()) + "."


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs per case (default 3)")
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    single_count = 100 if args.quick else 1_000
    per_writer = 25 if args.quick else 250
    pg = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    pool = c.turn_pool(size=max(single_count, per_writer * WRITERS))
    texts = pool.texts
    rows = []
    trips: dict[str, str] = {}
    for kind in c.database_kinds(pg):
        with c.fresh_database(kind, pg) as url:
            one, latency, shared, separate = [], [], [], []
            for run in range(runs):
                rate, p50 = single(url, texts[:single_count])
                one.append(rate)
                latency.append(p50)
                shared.append(concurrent(url, texts, per_writer, shared=True))
                separate.append(concurrent(url, texts, per_writer, shared=False))
                print(
                    f"{kind} run {run + 1}: one writer {rate:,.0f}/s, 8 on one conversation "
                    f"{shared[-1]:,.0f}/s, 8 on 8 conversations {separate[-1]:,.0f}/s",
                    flush=True,
                )
            transactions, statements = round_trips(url, texts[:50])
            trips[kind] = f"{transactions:g} transaction(s) and {statements:g} statements"
            rows.append(
                [
                    kind,
                    c.fmt_int(c.median(one)),
                    f"{c.median(latency) * 1000:.2f}",
                    c.fmt_int(c.median(shared)),
                    c.fmt_int(c.median(separate)),
                ]
            )
    headers = [
        "database",
        "1 writer msg/s",
        "1 writer ms/append (p50)",
        "8 writers, 1 conversation msg/s",
        "8 writers, 8 conversations msg/s",
    ]
    result_table = c.table(headers, rows)
    print()
    print(result_table)
    if args.record:
        body = "\n".join(
            [
                f"`conv.add()` of generated chat turns (user ~40, assistant ~250 tokens). One "
                f"writer: {single_count:,} appends; 8 writer processes: {per_writer} appends each, "
                f"started together at a barrier. Median of {runs} runs; every run checked that "
                "each turn was stored once with gap-free seq. SQLite: a file in WAL mode on the "
                "local disk, default `synchronous`. With 2 cores, 8 writer processes compete "
                "for CPU as well as for the conversation's lock.",
                "",
                result_table,
                "",
                "Each `conv.add()` here ran, on average, "
                + "; ".join(f"{v} on {k}" for k, v in trips.items())
                + " (the locked append, and any read the budget check needs). "
                + _postgres_settings(pg)
                + " One writer spends its time on round trips and Python work, one statement "
                "at a time; 8 writers overlap them and share WAL flushes (group commit). On one "
                "conversation they queue on its row lock; on separate conversations they do not "
                "wait for each other. SQLite has one write lock for the whole file, so 8 writers "
                "queue on it wherever they write.",
            ]
        )
        c.record("appends", body, postgres_url=pg, command=c.command_line())


if __name__ == "__main__":
    main()
