"""Bulk ingest: `conv.extend(turns)` against `conv.add()`, per turn.

`conv.add()` appends one turn per transaction; `conv.extend()` checks every
turn exactly as `add` does (content, redaction, token count, budget) and then
appends them all in one transaction under the conversation's lock. The same
generated chat turns (user ~40, assistant ~250 tokens) go through both. After
each run the turns are checked: every one stored once, seq gap-free.

    python bench/extend.py [--quick] [--record]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from appends import single

from convo import ConversationStore


def bulk(url: str, texts: list[str], count: int) -> float:
    """Seconds per turn of one ``conv.extend()`` of ``count`` turns."""
    turns = [("user" if i % 2 == 0 else "assistant", texts[i % len(texts)]) for i in range(count)]
    with ConversationStore(url) as store:
        conv = store.create(title="bulk")
        conv.add("user", "warm-up")
        started = time.perf_counter()
        conv.extend(turns)
        elapsed = time.perf_counter() - started
        seqs = [m.seq for m in store.get(conv.id).iter_history()]
        if seqs != list(range(1, count + 2)):
            raise AssertionError(f"{len(seqs)} turns stored, expected 1..{count + 1}")
    return elapsed / count


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="runs per case (default 3)")
    args = p.parse_args()
    runs = 1 if args.quick else args.runs
    add_count = 200 if args.quick else 1_000
    sizes = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
    pg = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    texts = c.turn_pool(size=4_000).texts
    rows = []
    for kind in c.database_kinds(pg):
        with c.fresh_database(kind, pg) as url:
            add_rate = c.median([single(url, texts[:add_count])[0] for _ in range(runs)])
            per_add = 1 / add_rate
            for size in sizes:
                repeat = runs if size < 100_000 else 1
                per_turn = c.median([bulk(url, texts, size) for _ in range(repeat)])
                rows.append(
                    [
                        kind,
                        f"{size:,}",
                        f"{per_add * 1000:.3f}",
                        f"{per_turn * 1000:.3f}",
                        c.fmt_int(1 / per_turn),
                        f"{per_add / per_turn:.1f}x",
                    ]
                )
                print(c.table(HEADERS, rows[-1:]), flush=True)
    result = c.table(HEADERS, rows)
    print()
    print(result)
    if args.record:
        body = (
            f"`conv.add()`: {add_count:,} appends, one transaction each (median of {runs} runs). "
            "`conv.extend()`: one call with the given number of turns, one transaction "
            f"(median of {runs} runs; one run at 100,000). Both check, count and index every "
            "turn the same way; *speed-up* is ms per `add` / ms per turn of `extend`. "
            "SQLite: a file in WAL mode, default `synchronous`.\n\n" + result
        )
        c.record("extend", body, postgres_url=pg, command=c.command_line())


HEADERS = [
    "database",
    "turns per extend()",
    "add() ms/turn",
    "extend() ms/turn",
    "extend() turns/s",
    "speed-up",
]

if __name__ == "__main__":
    main()
