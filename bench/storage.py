"""What a stored message costs on disk, live and archived, and how well archive blocks compress.

Two databases hold the same generated conversation (varied English-like chat
text, deterministic, see ``_common.ChatText``):

* *live*: every turn appended with ``conv.add()`` and never compacted;
* *compacted*: the same turns appended with ``conv.add()``, with
  ``conv.window()`` after every user turn, as ``conv.send()`` does, so convo
  archives old turns into zlib+base64 blocks with a rolling summary whenever
  the live turns pass the 20,000-token budget (summaries of a Claude summary's
  size, made offline).

Sizes are physical: SQLite's ``dbstat`` after ``VACUUM``; PostgreSQL's
``pg_total_relation_size`` (heap, TOAST and indexes) after ``VACUUM FULL``.
Then the compression ratio of the archive blocks convo wrote, and of the same
turns packed into blocks of other sizes. The figures are deterministic (one run).

    python bench/storage.py [--quick] [--record]
"""

from __future__ import annotations

import base64
import sqlite3
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
from sqlalchemy import create_engine, select, text

from convo import ConversationStore
from convo._archive import ArchivedTurn, pack
from convo._database import resolve_url, sqlite_file
from convo._models import ArchiveBlockRow

#: Groups of convo's tables (a table belongs to the first group whose prefix it has).
GROUPS = {
    "messages": "convo_messages",
    "archive blocks": "convo_archive_blocks",
    "summaries": "convo_summaries",
    "search index": "convo_search",  # its text, and the full-text index (FTS5 tables, GIN)
}


def grow(url: str, pool: c.TurnPool, count: int, *, compact: bool) -> str:
    with ConversationStore(url, summarizer=c.BenchSummarizer(), token_budget=c.BUDGET) as store:
        conv = store.create(system=c.system_prompt(), title="storage")
        for i in range(count):
            role = pool.roles[i % len(pool)]
            conv.add(role, pool.texts[i % len(pool)])
            if compact and role == "user":
                conv.window()
        return str(conv.id)


def _group(table: str) -> str | None:
    for group, prefix in GROUPS.items():
        if table.startswith(prefix):
            return group
    return None  # conversations, calibration, version: a few pages whatever the size


def table_bytes(url: str) -> dict[str, int]:
    """Physical bytes per group of convo tables, indexes (and TOAST) included."""
    sizes = dict.fromkeys(GROUPS, 0)
    path = sqlite_file(resolve_url(url))
    if path is not None:
        con = sqlite3.connect(path)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            con.execute("VACUUM")
            owner = dict(con.execute("SELECT name, tbl_name FROM sqlite_master"))
            for name, size in con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
                group = _group(owner.get(name, name))
                if group:
                    sizes[group] += size
        finally:
            con.close()
        return sizes
    engine = create_engine(resolve_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            tables = connection.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                    "AND tablename LIKE 'convo%'"
                )
            ).scalars()
            for table in list(tables):
                group = _group(table)
                if group is None:
                    continue
                connection.execute(text(f"VACUUM FULL ANALYZE {table}"))
                sizes[group] += int(
                    connection.execute(
                        text("SELECT pg_total_relation_size(:t)"), {"t": table}
                    ).scalar()
                )
        return sizes
    finally:
        engine.dispose()


def block_stats(url: str) -> tuple[int, int, int, int, int]:
    """(blocks, turns archived, raw JSON bytes, zlib bytes, base64 bytes) of the stored blocks."""
    engine = create_engine(resolve_url(url))
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(
                    ArchiveBlockRow.first_seq,
                    ArchiveBlockRow.last_seq,
                    ArchiveBlockRow.raw_bytes,
                    ArchiveBlockRow.payload,
                )
            ).all()
    finally:
        engine.dispose()
    turns = sum(r.last_seq - r.first_seq + 1 for r in rows)
    raw = sum(r.raw_bytes for r in rows)
    compressed = sum(len(base64.b64decode(r.payload)) for r in rows)
    b64 = sum(len(r.payload) for r in rows)
    return len(rows), turns, raw, compressed, b64


def block_size_sweep(pool: c.TurnPool, count: int) -> list[list[str]]:
    rows = []
    turns = [
        ArchivedTurn(s, pool.roles[(s - 1) % len(pool)], pool.contents[(s - 1) % len(pool)])
        for s in range(1, count + 1)
    ]
    for size in (1, 5, 10, 25, 50, 100, 400):
        raw = compressed = b64 = 0
        for lo in range(0, len(turns) - size + 1, size):
            packed = pack(turns[lo : lo + size])
            raw += packed.raw_bytes
            b64 += len(packed.payload)
            compressed += len(base64.b64decode(packed.payload))
        rows.append(
            [
                str(size),
                f"{raw / compressed:.2f}",
                f"{raw / b64:.2f}",
                f"{zlib_level_ratio(turns[: size * (len(turns) // size)], size, 6):.2f}",
            ]
        )
    return rows


def zlib_level_ratio(turns: list[ArchivedTurn], size: int, level: int) -> float:
    """Raw/compressed at another zlib level (convo uses 9), same blocks."""
    import json

    raw = compressed = 0
    for lo in range(0, len(turns), size):
        doc = [{"seq": t.seq, "role": t.role, "content": t.content} for t in turns[lo : lo + size]]
        data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
        raw += len(data)
        compressed += len(zlib.compress(data, level))
    return raw / compressed


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    count = 400 if args.quick else 4_000
    pg = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    pool = c.turn_pool()
    size_rows = []
    per_message: dict[str, dict[str, float]] = {}
    compression: tuple[int, int, int, int, int] | None = None
    for kind in c.database_kinds(pg):
        per_message[kind] = {}
        for state in ("live", "compacted"):
            with c.fresh_database(kind, pg) as url:
                print(f"{kind}: {count:,} turns, {state}", flush=True)
                grow(url, pool, count, compact=state == "compacted")
                sizes = table_bytes(url)
                if state == "compacted" and compression is None:
                    compression = block_stats(url)
                total = sum(sizes.values())
                per_message[kind][state] = total / count
                for group, size in sizes.items():
                    per_message[kind][f"{state} {group}"] = size / count
                size_rows.append(
                    [
                        kind,
                        state,
                        *(c.fmt_int(v) for v in sizes.values()),
                        c.fmt_int(total),
                        c.fmt_int(total / count),
                    ]
                )
    assert compression is not None
    blocks, archived, raw, compressed, b64 = compression
    raw_per_turn = raw / archived
    sizes_table = c.table(
        [
            "database",
            "state",
            *GROUPS,
            "total bytes",
            "bytes per message",
        ],
        size_rows,
    )
    ratio_rows = []
    for kind, v in per_message.items():
        for state in ("live", "compacted"):
            ratio_rows.append(
                [
                    kind,
                    state,
                    *(c.fmt_int(v[f"{state} {g}"]) for g in GROUPS),
                    c.fmt_int(v[state]),
                ]
            )
        ratio_rows.append(
            [kind, "live / compacted", "", "", "", "", f"{v['live'] / v['compacted']:.2f}x"]
        )
    ratio_table = c.table(
        ["database", "state", *(f"{g}" for g in GROUPS), "bytes/message"], ratio_rows
    )
    search_notes = []
    for kind, v in per_message.items():
        search = v["compacted search index"]
        if search:
            live, compacted = v["live"] - v["live search index"], v["compacted"] - search
            search_notes.append(
                f"- {kind}: the search index is {search:,.0f} bytes per message, "
                f"{search / v['compacted']:.0%} of a compacted conversation. Without it a "
                f"message costs {live:,.0f} bytes live and {compacted:,.0f} compacted "
                f"({live / compacted:.2f}x)."
            )
    blocks_text = (
        f"convo's own blocks (SQLite run): {blocks:,} blocks holding {archived:,} turns "
        f"({archived / blocks:.1f} turns, {raw / blocks / 1024:.1f} KiB of JSON per block; "
        f"{raw_per_turn:,.0f} bytes of JSON per turn). zlib level 9: "
        f"**{raw / compressed:.2f}x**; as stored (base64): **{raw / b64:.2f}x**, i.e. "
        f"{b64 / archived:,.0f} bytes per archived turn. base64 costs "
        f"{(b64 / compressed - 1) * 100:.0f}% over the compressed bytes."
    )
    sweep_table = c.table(
        ["turns per block", "zlib-9 ratio", "stored (base64) ratio", "zlib-6 ratio"],
        block_size_sweep(pool, min(count, 2_000)),
    )
    print()
    print(sizes_table)
    print()
    print(ratio_table)
    print("\n".join(search_notes))
    print()
    print(blocks_text)
    print()
    print(sweep_table)
    if args.record:
        body = "\n".join(
            [
                f"{count:,} generated chat turns (user ~40, assistant ~250 cl100k tokens), system "
                f"prompt ~2,000 tokens, budget {c.BUDGET:,}. *compacted* is the state convo "
                "leaves while the conversation grows (`conv.window()` after each user turn): "
                "all but the live window archived, one rolling summary (~450 tokens) kept per "
                "compaction. An archived turn keeps its row (seq, role, token count, usage, "
                "timestamps; content NULL) and, when the schema has full-text search, its text "
                "in `convo_search` with the full-text index (FTS5 tables on SQLite, a GIN index "
                "on PostgreSQL), so that search covers the whole history. Bytes include indexes "
                "(and TOAST on PostgreSQL); the second table is the first divided by the number "
                "of messages.",
                "",
                sizes_table,
                "",
                ratio_table,
                "",
                *search_notes,
                "",
                "### Archive block compression",
                "",
                blocks_text,
                "",
                "The same turns packed into blocks of other sizes (convo's blocks are as large "
                f"as one compaction, ~{archived / blocks:.0f} turns at this budget):",
                "",
                sweep_table,
            ]
        )
        c.record("storage", body, postgres_url=pg, command=c.command_line())


if __name__ == "__main__":
    main()
