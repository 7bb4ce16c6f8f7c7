"""Export speed and memory: `convo export --all` over a million stored messages.

The database is filled in bulk (SQLAlchemy Core) with 1,000 conversations of
1,000 turns of generated chat text (the last 20% of each live, the rest in
archive blocks, as compaction leaves them). Then `convo export --all` runs in a
child process for each format, writing to a file; the table gives messages
per second and the child's peak resident memory. The same export of a tenth
of the data shows that memory does not grow with the number of messages.

    python bench/export.py [--quick] [--record]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from sqlalchemy import create_engine, insert

from convo._archive import ArchivedTurn, pack
from convo._database import resolve_url
from convo._ids import new_conversation_id
from convo._models import ArchiveBlockRow, ConversationRow, MessageRow, SearchTextRow
from convo._search import searchable_text

TURNS_PER_CONVERSATION = 1_000
ARCHIVED_SHARE = 0.8
BLOCK_TURNS = 50


def fill(url: str, conversations: int, pool: c.TurnPool) -> int:
    """Insert ``conversations`` x 1,000 turns in bulk; returns the number of turns."""
    engine = create_engine(resolve_url(url))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    archived = int(TURNS_PER_CONVERSATION * ARCHIVED_SHARE)
    total = 0
    try:
        for n in range(conversations):
            conversation_id = new_conversation_id()
            created = start + timedelta(minutes=n)
            messages, blocks, search = [], [], []
            for i in range(TURNS_PER_CONVERSATION):
                k = (n * 37 + i) % len(pool)
                seq = i + 1
                role = "user" if i % 2 == 0 else "assistant"
                messages.append(
                    {
                        "conversation_id": conversation_id,
                        "seq": seq,
                        "role": role,
                        "content": None if seq <= archived else pool.contents[k],
                        "token_count": pool.tokens[k],
                        "status": "complete",
                        "created_at": created + timedelta(seconds=seq),
                    }
                )
                search.append(
                    {
                        "conversation_id": conversation_id,
                        "seq": seq,
                        "text": searchable_text(pool.contents[k]),
                    }
                )
            for first in range(1, archived + 1, BLOCK_TURNS):
                turns = [
                    ArchivedTurn(
                        s,
                        "user" if (s - 1) % 2 == 0 else "assistant",
                        pool.contents[(n * 37 + s - 1) % len(pool)],
                    )
                    for s in range(first, min(first + BLOCK_TURNS, archived + 1))
                ]
                block = pack(turns)
                blocks.append(
                    {
                        "conversation_id": conversation_id,
                        "first_seq": block.first_seq,
                        "last_seq": block.last_seq,
                        "payload": block.payload,
                        "checksum": block.checksum,
                        "raw_bytes": block.raw_bytes,
                        "created_at": created,
                    }
                )
            with engine.begin() as connection:
                connection.execute(
                    insert(ConversationRow.__table__),
                    [
                        {
                            "id": conversation_id,
                            "title": f"conversation {n}",
                            "metadata": {},
                            "last_seq": TURNS_PER_CONVERSATION,
                            "archived_through_seq": archived,
                            "created_at": created,
                            "updated_at": created + timedelta(hours=1),
                        }
                    ],
                )
                connection.execute(insert(MessageRow.__table__), messages)
                connection.execute(insert(ArchiveBlockRow.__table__), blocks)
                connection.execute(insert(SearchTextRow.__table__), search)
            total += len(messages)
            if (n + 1) % 100 == 0:
                print(f"  {total:,} messages stored", flush=True)
    finally:
        engine.dispose()
    return total


_CHILD = (
    "import resource, sys\n"
    "from convo._cli import cli\n"
    "cli.main(sys.argv[1:], prog_name='convo', standalone_mode=False)\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
)


def export_run(url: str, fmt: str, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of `convo export --all` in a child process of its own."""
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            "export",
            "--all",
            "--format",
            fmt,
            "-o",
            str(out),
            "--db",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return elapsed, peak_kib / 1024


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    conversations = 100 if args.quick else 1_000
    pg = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    pool = c.turn_pool()
    rows = []
    for kind in c.database_kinds(pg):
        for size in (conversations // 10, conversations):
            with c.fresh_database(kind, pg) as url, tempfile.TemporaryDirectory() as tmp:
                print(f"{kind}: filling {size * TURNS_PER_CONVERSATION:,} messages", flush=True)
                total = fill(url, size, pool)
                for fmt in ("jsonl", "markdown"):
                    out = Path(tmp) / f"export.{fmt}"
                    runs = [export_run(url, fmt, out) for _ in range(1 if size > 100 else 3)]
                    seconds = c.median([r[0] for r in runs])
                    peak = max(r[1] for r in runs)
                    rows.append(
                        [
                            kind,
                            f"{total:,}",
                            fmt,
                            f"{total / seconds:,.0f}",
                            f"{seconds:.1f}",
                            f"{peak:.0f}",
                            f"{out.stat().st_size / 2**20:,.0f}",
                        ]
                    )
                    print(
                        c.table(
                            [
                                "database",
                                "messages",
                                "format",
                                "messages/s",
                                "seconds",
                                "peak RSS MiB",
                                "file MiB",
                            ],
                            rows[-1:],
                        ),
                        flush=True,
                    )
    headers = [
        "database",
        "messages",
        "format",
        "messages/s",
        "seconds",
        "peak RSS MiB",
        "file MiB",
    ]
    body = (
        f"{conversations:,} conversations of {TURNS_PER_CONVERSATION:,} turns "
        f"({ARCHIVED_SHARE:.0%} of each in archive blocks of {BLOCK_TURNS} turns), "
        "exported with `convo export --all -o FILE` in a child process; peak RSS is the "
        "child's. One run at the full size, median of three at a tenth of it.\n\n"
        + c.table(headers, rows)
        + "\n\nPeak memory is the same at a tenth of the messages and at all of them: "
        "export streams one conversation at a time, reading turns in batches of 1,000."
    )
    print()
    print(c.table(headers, rows))
    if args.record:
        c.record("export", body, postgres_url=pg, command=c.command_line())


if __name__ == "__main__":
    main()
