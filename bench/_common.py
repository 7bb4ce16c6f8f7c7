"""Shared helpers of the benchmarks: arguments, databases, chat text, tables, RESULTS.md.

Nothing here is convo's API; the benchmarks use convo as an application would,
and reach under it (SQLAlchemy Core on convo's tables) only to build large
conversations quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "RESULTS.md"
if str(ROOT) not in sys.path:  # for `tests.fakeapi`, when run as `python bench/x.py`
    sys.path.insert(0, str(ROOT))

#: The PostgreSQL database the benchmarks own (created on first use, emptied per run).
DEFAULT_POSTGRES_URL = os.environ.get(
    "CONVO_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/convo_bench"
)


# -- arguments ------------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; add your own before ``parse_args``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument(
        "--record",
        action="store_true",
        help="write this benchmark's section of bench/RESULTS.md (with machine details)",
    )
    p.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="a PostgreSQL database the benchmark may empty (default: %(default)s; created "
        "with CREATE DATABASE if missing; env CONVO_BENCH_POSTGRES_URL)",
    )
    p.add_argument("--no-postgres", action="store_true", help="SQLite only")
    return p


# -- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank, interpolated) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * pct / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def timed(fn: Callable[[], Any], repeat: int, *, warmup: int = 3) -> list[float]:
    """Seconds per call of ``fn``, ``repeat`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


# -- tables and RESULTS.md ------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for text_line in Path("/proc/cpuinfo").read_text().splitlines():
            if text_line.startswith("model name"):
                return text_line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_gib() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for text_line in Path("/proc/meminfo").read_text().splitlines():
            if text_line.startswith("MemTotal:"):
                return f"{int(text_line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def postgres_version(url: str | None) -> str:
    if url is None:
        return "not used"
    from sqlalchemy import create_engine, text

    from convo._database import resolve_url

    engine = create_engine(resolve_url(url))
    try:
        with engine.connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar()).split()[0]
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    finally:
        engine.dispose()


def source_digest() -> str:
    """A digest of convo's source and migrations: which code the figures are of (no git here)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("convo/*.py"), *ROOT.glob("migrations/versions/*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine_details(postgres_url: str | None) -> str:
    """CPU, cores, RAM, Python, SQLite, PostgreSQL, library versions and the date."""
    import sqlalchemy

    import convo

    parts = [
        f"CPU: {_cpu_model()}",
        f"cores: {os.cpu_count()}",
        f"RAM: {_ram_gib()}",
        f"Python {platform.python_version()} ({sys.executable})",
        f"SQLite {sqlite3.sqlite_version}",
        f"PostgreSQL {postgres_version(postgres_url)}",
        f"SQLAlchemy {sqlalchemy.__version__}",
        f"convo {convo.__version__} (source digest {source_digest()}, schema {_schema_head()})",
        f"{platform.system()} {platform.release()}",
        f"date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    return "; ".join(parts)


def _schema_head() -> str:
    from convo import _migrations

    return _migrations.head_revision()


SECTIONS = {
    "context_assembly": "Context assembly: `conv.window()` per turn",
    "peer_langchain": "Peer: LangChain `SQLChatMessageHistory` + `trim_messages`",
    "appends": "Appends: messages per second",
    "extend": "Bulk ingest: `conv.extend()` against `conv.add()`",
    "storage": "Storage: bytes per message, live and archived",
    "cost": "Cost: a 300-turn conversation",
    "recall": "Recall: finding the turn that answers a question",
    "export": "Export",
    "summaries": "Summaries: facts kept, size and time of the extractive summarizer",
    "startup": "Startup: `convo --help`, `convo list`, `convo send`",
    "backlog": "Backlog: 100,000 turns added, then compacted in bounded chunks",
    "async_sends": "Async: 100 conversations sending at once from one process",
}

_PLACEHOLDERS: dict[str, str] = {}

_HEADER = """# convo benchmark results

Written by the scripts in `bench/` (see `bench/README.md`); each section is replaced
by `python bench/<name>.py --record`. Timings are medians of several runs on the
machine named in the section; nothing here is a test assertion.
"""


def _marker(name: str, edge: str) -> str:
    return f"<!-- bench:{name}:{edge} -->"


def record(name: str, body: str, *, postgres_url: str | None, command: str) -> None:
    """Replace (or add) section ``name`` of RESULTS.md, keeping the others."""
    existing = RESULTS.read_text() if RESULTS.exists() else ""
    bodies: dict[str, str] = {}
    for key in SECTIONS:
        match = re.search(
            re.escape(_marker(key, "start")) + r"\n(.*?)" + re.escape(_marker(key, "end")),
            existing,
            re.S,
        )
        if match:
            bodies[key] = match.group(1)
    bodies[name] = (
        f"## {SECTIONS[name]}\n\n"
        f"Command: `{command}`  \n"
        f"Machine: {machine_details(postgres_url)}\n\n"
        f"{body.strip()}\n\n"
    )
    out = [_HEADER]
    for key, title in SECTIONS.items():
        text = bodies.get(key)
        if key in _PLACEHOLDERS:
            text = f"## {title}\n\n{_PLACEHOLDERS[key]}\n\n"
        elif text is None:
            text = f"## {title}\n\nNot recorded yet: run `python bench/{key}.py --record`.\n\n"
        out.append(f"{_marker(key, 'start')}\n{text}{_marker(key, 'end')}\n")
    RESULTS.write_text("\n".join(out))
    print(f"\nrecorded in {RESULTS.relative_to(ROOT)}")


def command_line() -> str:
    return "python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


# -- databases ------------------------------------------------------------------------------


def prepare_postgres(url: str, *, enabled: bool = True) -> str | None:
    """``url`` if its server answers (creating its database if missing), else None with a note."""
    if not enabled:
        print("PostgreSQL: skipped (--no-postgres)")
        return None
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from convo._database import resolve_url

    target = resolve_url(url)
    name = target.database
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            exists = connection.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            ).scalar()
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
                print(f"PostgreSQL: created database {name}")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"PostgreSQL: not reachable at {make_url(url).render_as_string(hide_password=True)} "
            f"({type(exc).__name__}: {first}); PostgreSQL figures are skipped"
        )
        return None
    finally:
        admin.dispose()
    return url


def empty_postgres(url: str) -> None:
    """Drop everything in the benchmark database's public schema (it is the benchmarks' own)."""
    from sqlalchemy import create_engine, text

    from convo._database import resolve_url

    engine = create_engine(resolve_url(url))
    try:
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


def upgrade(url: str) -> None:
    """``convo db upgrade --db URL``, in process."""
    from convo import _migrations
    from convo._database import Database, resolve_url

    database = Database(resolve_url(url))
    try:
        _migrations.upgrade(database)
    finally:
        database.close()


@contextlib.contextmanager
def fresh_database(kind: str, postgres_url: str | None, *, migrate: bool = True) -> Iterator[str]:
    """The URL of an empty database of ``kind`` ("sqlite" or "postgresql"), at convo's schema."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="convo-bench-") as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            if migrate:
                upgrade(url)
            yield url
        return
    assert postgres_url is not None
    empty_postgres(postgres_url)
    if migrate:
        upgrade(postgres_url)
    try:
        yield postgres_url
    finally:
        empty_postgres(postgres_url)


def database_kinds(postgres_url: str | None) -> list[str]:
    return ["sqlite"] + (["postgresql"] if postgres_url else [])


# -- chat text ------------------------------------------------------------------------------

_USER_OPENERS = [
    "",
    "",
    "",
    "Thanks! ",
    "Okay, ",
    "Quick question: ",
    "Hmm, ",
    "Great, that helps. ",
    "Sorry, one more thing. ",
    "Follow-up: ",
    "I see. ",
    "Wait, ",
]
_USER_ASKS = [
    "Can you explain why {w} matters here?",
    "What happens if {w} is missing?",
    "How would you do that with {w} instead?",
    "Is there a simpler way to handle {w}?",
    "Could you give me an example with {w}?",
    "Why does the {w} part behave like that?",
    "What should I watch out for with {w}?",
    "Can you summarise the difference between {w} and {v}?",
    "Does this still work when {w} is {n}?",
    "My deadline is {date}; which of these should I do first?",
]
_ASSISTANT_OPENERS = [
    "Good question.",
    "Sure.",
    "Short answer: it depends on the {w}.",
    "Here is how it works.",
    "Yes, with one caveat.",
    "Let me break that down.",
    "Not quite, and the reason is subtle.",
    "Right.",
]
_NAMES = ["Ana", "Bo", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ines", "Jonas"]


@dataclass(frozen=True)
class _Corpus:
    chain: dict[tuple[str, str], list[str]]
    starts: list[tuple[str, str]]
    code: list[str]
    words: list[str]


def _build_corpus() -> _Corpus:
    """An order-2 word Markov chain over the English prose of Python's bundled pydoc topics."""
    import pydoc_data.topics

    chain: dict[tuple[str, str], list[str]] = {}
    starts: list[tuple[str, str]] = []
    code: list[str] = []
    words_seen: set[str] = set()
    for key in sorted(pydoc_data.topics.topics):
        doc = pydoc_data.topics.topics[key]
        paragraphs = re.split(r"\n\s*\n", doc)
        for para in paragraphs:
            lines = para.splitlines()
            if not lines or set(lines[-1].strip()) <= set("*=-"):
                continue
            if all(ln.startswith("   ") for ln in lines if ln.strip()):
                snippet = "\n".join(ln[3:] for ln in lines)
                if 1 <= len(lines) <= 8 and ">>>" not in snippet and "::=" not in snippet:
                    code.append(snippet)
                continue
            if "+--" in para or " | " in para or "===" in para:
                continue  # tables
            words = " ".join(ln.strip() for ln in lines).replace('"', "`").split()
            if len(words) < 6:
                continue
            for i in range(len(words) - 2):
                pair = (words[i], words[i + 1])
                chain.setdefault(pair, []).append(words[i + 2])
                sentence_start = i == 0 or words[i - 1].endswith((".", "?", "!", ":"))
                if sentence_start and words[i][:1].isupper():
                    starts.append(pair)
            words_seen.update(w.strip(".,:;()`*").lower() for w in words)
    vocab = sorted(w for w in words_seen if w.isalpha() and len(w) > 4)
    return _Corpus(chain, starts, code, vocab)


class ChatText:
    """Deterministic, varied English-like chat turns (no downloads).

    Prose comes from an order-2 Markov chain over the English text that
    Python ships in ``pydoc_data.topics``; turns add chat framing, names,
    numbers and dates, and assistant turns sometimes carry a bullet list or
    a short code block. Sizes: user turns ~15-120 tokens, assistant turns
    ~120-600 tokens (cl100k), like a chat with substantial answers.
    """

    _corpus: _Corpus | None = None

    def __init__(self, seed: int = 1) -> None:
        if ChatText._corpus is None:
            ChatText._corpus = _build_corpus()
        self.corpus = ChatText._corpus
        self.rng = random.Random(seed)

    def _sentence(self, max_words: int = 40) -> str:
        rng, corpus = self.rng, self.corpus
        pair = rng.choice(corpus.starts)
        out = [pair[0], pair[1]]
        while len(out) < max_words:
            following = corpus.chain.get(pair)
            if not following:
                break
            word = rng.choice(following)
            out.append(word)
            pair = (pair[1], word)
            if word.endswith((".", "?", "!")) and len(out) >= 6:
                break
        text = " ".join(out)
        if not text.endswith((".", "?", "!")):
            text = text.rstrip(",;:") + "."
        return text

    def _fill(self, template: str) -> str:
        rng = self.rng
        return template.format(
            w=rng.choice(self.corpus.words),
            v=rng.choice(self.corpus.words),
            n=rng.randint(0, 10_000),
            date=f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        )

    def user(self) -> str:
        rng = self.rng
        parts = [self._fill(rng.choice(_USER_OPENERS))]
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            parts.append(self._sentence(30) + " ")
        if rng.random() < 0.15:
            parts.append(f"{rng.choice(_NAMES)} said the limit is {rng.randint(2, 500)}. ")
        parts.append(self._fill(rng.choice(_USER_ASKS)))
        return "".join(parts).strip()

    def assistant(self) -> str:
        rng = self.rng
        paragraphs = [self._fill(rng.choice(_ASSISTANT_OPENERS))]
        for _ in range(rng.randint(1, 4)):
            sentences = [self._sentence() for _ in range(rng.randint(2, 5))]
            paragraphs.append(" ".join(sentences))
        roll = rng.random()
        if roll < 0.25:
            items = [f"- {self._sentence(18)}" for _ in range(rng.randint(2, 5))]
            paragraphs.insert(rng.randint(1, len(paragraphs)), "\n".join(items))
        elif roll < 0.45 and self.corpus.code:
            paragraphs.insert(
                rng.randint(1, len(paragraphs)),
                "```python\n" + rng.choice(self.corpus.code) + "\n```",
            )
        if rng.random() < 0.3:
            paragraphs.append(
                f"For {rng.choice(_NAMES)}'s case ({rng.randint(1, 99)} items, "
                f"{rng.randint(1, 60)} minutes), that comes to about "
                f"{rng.randint(100, 99_999):,} in total."
            )
        return "\n\n".join(paragraphs)

    def turns(self, count: int) -> list[tuple[str, str]]:
        """``count`` alternating (role, text) turns, starting with the user."""
        return [
            ("user", self.user()) if i % 2 == 0 else ("assistant", self.assistant())
            for i in range(count)
        ]


def system_prompt(tokens: int = 2_000, seed: int = 99) -> str:
    """A deterministic system prompt of about ``tokens`` cl100k tokens."""
    from convo import TiktokenCounter

    counter = TiktokenCounter()
    gen = ChatText(seed)
    parts = [
        "You are a patient, precise assistant for a team of software engineers. Follow the "
        "house rules below in every answer."
    ]
    while counter.count("\n\n".join(parts)) < tokens:
        parts.append(f"Rule {len(parts)}: " + " ".join(gen._sentence() for _ in range(3)))
    return "\n\n".join(parts)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


# -- large conversations, built fast ----------------------------------------------------------

#: The benchmarks' budget (input tokens per request) and model.
BUDGET = 20_000
MODEL = "claude-sonnet-5-5"


@dataclass(frozen=True)
class TurnPool:
    """Distinct generated turns, counted once, reused cyclically by long conversations.

    A pool of a few thousand turns is far longer than zlib's 32 KiB window, so
    archive blocks built from it compress as fresh text would.
    """

    roles: list[str]
    texts: list[str]
    contents: list[list[dict[str, Any]]]
    tokens: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def turn_pool(size: int = 4_000, seed: int = 7) -> TurnPool:
    from convo import TiktokenCounter
    from convo._tokens import count_turn

    counter = TiktokenCounter()
    turns = ChatText(seed).turns(size)
    contents = [[{"type": "text", "text": text}] for _, text in turns]
    return TurnPool(
        roles=[role for role, _ in turns],
        texts=[text for _, text in turns],
        contents=contents,
        tokens=[count_turn(counter, c) for c in contents],
    )


_SUMMARY_BODY: str | None = None


def summary_text(through_seq: int) -> str:
    """A stand-in rolling summary of about 450 tokens (a realistic Claude summary's size)."""
    global _SUMMARY_BODY
    if _SUMMARY_BODY is None:
        gen = ChatText(4242)
        _SUMMARY_BODY = "\n".join(f"- {gen._sentence(30)}" for _ in range(16))
    return f"The user and the assistant have covered turns 1-{through_seq}.\n{_SUMMARY_BODY}"


@dataclass
class PlannedConversation:
    """Rows of one compacted conversation, ready to insert (no conversation id yet)."""

    messages: int
    archived_through: int
    messages_rows: list[dict[str, Any]]
    block_rows: list[dict[str, Any]]
    summary_rows: list[dict[str, Any]]
    live_tokens: int
    #: The content of every turn by seq (archived ones included), for derived tables.
    archived_content: dict[int, list[dict[str, Any]]]


def plan_conversation(
    pool: TurnPool, count: int, *, system: str, budget: int = BUDGET, low_water: float = 0.55
) -> PlannedConversation:
    """The rows a conversation of ``count`` turns has after convo compacted it as it grew.

    Replays convo's own rule (``plan_compaction`` with the store's default
    calibration factor, system prompt and latest summary as fixed parts) after
    every turn, so the archive blocks, summaries and live window are the ones a
    real conversation grown turn by turn would have.
    """
    from convo import TiktokenCounter
    from convo._archive import ArchivedTurn, pack
    from convo._budget import DEFAULT_MAX_TOKENS, Calibration, effective_budget
    from convo._models import utcnow
    from convo._window import LiveTurn, SummaryPart, plan_compaction, summary_block, system_blocks

    counter = TiktokenCounter()
    factor = Calibration().effective_factor
    usable = effective_budget(budget, model=MODEL, max_tokens=DEFAULT_MAX_TOKENS)
    system_tokens = sum(counter.count(b["text"]) for b in system_blocks(system))
    summary_tokens = 0
    live: list[LiveTurn] = []
    cuts: list[int] = []
    for seq in range(1, count + 1):
        i = (seq - 1) % len(pool)
        live.append(LiveTurn(seq, pool.roles[i], pool.contents[i], pool.tokens[i]))
        fixed = system_tokens + summary_tokens
        archive = plan_compaction(
            live,
            available=int(usable / factor) - fixed,
            low_water=int(usable * low_water / factor) - fixed,
        )
        if archive:
            through = live[archive - 1].seq
            cuts.append(through)
            live = live[archive:]
            text = summary_block(SummaryPart(summary_text(through), through, 0))["text"]
            summary_tokens = counter.count(text)
    archived_through = cuts[-1] if cuts else 0
    start = utcnow() - dt.timedelta(days=30)
    messages_rows = []
    for seq in range(1, count + 1):
        i = (seq - 1) % len(pool)
        role = pool.roles[i]
        assistant = role == "assistant"
        messages_rows.append(
            {
                "seq": seq,
                "role": role,
                "content": None if seq <= archived_through else pool.contents[i],
                "token_count": pool.tokens[i],
                "status": "complete",
                "model": MODEL if assistant else None,
                "stop_reason": "end_turn" if assistant else None,
                "usage": (
                    {
                        "input_tokens": 12,
                        "cache_creation_input_tokens": 420,
                        "cache_read_input_tokens": 15_800,
                        "output_tokens": int(pool.tokens[i] * 1.2),
                    }
                    if assistant
                    else None
                ),
                "request_id": f"req_bench{seq:012d}" if assistant else None,
                "latency_ms": 4_000 if assistant else None,
                "created_at": start + dt.timedelta(seconds=seq),
            }
        )
    block_rows, summary_rows = [], []
    first = 1
    for through in cuts:
        turns = [
            ArchivedTurn(s, pool.roles[(s - 1) % len(pool)], pool.contents[(s - 1) % len(pool)])
            for s in range(first, through + 1)
        ]
        packed = pack(turns)
        created = start + dt.timedelta(seconds=through)
        block_rows.append(
            {
                "first_seq": packed.first_seq,
                "last_seq": packed.last_seq,
                "payload": packed.payload,
                "checksum": packed.checksum,
                "raw_bytes": packed.raw_bytes,
                "created_at": created,
            }
        )
        text = summary_text(through)
        summary_rows.append(
            {
                "through_seq": through,
                "text": text,
                "token_count": counter.count(summary_block(SummaryPart(text, through, 0))["text"]),
                "summarizer": "claude",
                "model": "claude-haiku-5-5",
                "usage": {"input_tokens": 9_000, "output_tokens": 600},
                "created_at": created,
            }
        )
        first = through + 1
    return PlannedConversation(
        messages=count,
        archived_through=archived_through,
        messages_rows=messages_rows,
        block_rows=block_rows,
        summary_rows=summary_rows,
        live_tokens=sum(t.tokens for t in live),
        archived_content={
            seq: pool.contents[(seq - 1) % len(pool)] for seq in range(1, archived_through + 1)
        },
    )


def _search_rows(
    conversation_id: str, plan: PlannedConversation
) -> tuple[Any, list[dict[str, Any]]] | None:
    """Rows of the full-text search table, if this convo has one (every turn, archived too)."""
    try:
        from convo._models import SearchTextRow
        from convo._search import searchable_text
    except ImportError:
        return None
    rows = []
    for row in plan.messages_rows:
        text = searchable_text(row["content"] or plan.archived_content[row["seq"]])
        if text:
            rows.append({"conversation_id": conversation_id, "seq": row["seq"], "text": text})
    return SearchTextRow.__table__, rows


def insert_conversation(store: Any, plan: PlannedConversation, *, system: str) -> str:
    """Create a conversation in ``store`` and bulk-insert ``plan``'s rows; its id."""
    from sqlalchemy import update

    from convo._models import ArchiveBlockRow, ConversationRow, MessageRow, SummaryRow

    conv = store.create(system=system, token_budget=BUDGET, title=f"{plan.messages} messages")
    engine = store.database.engine
    with engine.begin() as connection:
        for table, rows in (
            (MessageRow.__table__, plan.messages_rows),
            (ArchiveBlockRow.__table__, plan.block_rows),
            (SummaryRow.__table__, plan.summary_rows),
        ):
            for lo in range(0, len(rows), 5_000):
                chunk = [{**r, "conversation_id": conv.id} for r in rows[lo : lo + 5_000]]
                connection.execute(table.insert(), chunk)
        search = _search_rows(conv.id, plan)
        if search is not None:
            table, rows = search
            for lo in range(0, len(rows), 5_000):
                connection.execute(table.insert(), rows[lo : lo + 5_000])
        connection.execute(
            update(ConversationRow)
            .where(ConversationRow.id == conv.id)
            .values(last_seq=plan.messages, archived_through_seq=plan.archived_through)
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    return str(conv.id)


class BenchSummarizer:
    """Stands in for ``ClaudeSummarizer`` offline: a summary of a Claude summary's size."""

    def summarize(self, previous: str | None, turns: Sequence[Any], *, target_tokens: int) -> Any:
        from convo import SummaryResult

        if not turns:  # asked for a shorter version
            return SummaryResult((previous or "")[: target_tokens * 3], summarizer="claude")
        return SummaryResult(
            summary_text(turns[-1].seq),
            model="claude-haiku-5-5",
            usage={"input_tokens": 9_000, "output_tokens": 600},
            summarizer="claude",
        )
