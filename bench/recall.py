"""Ranked recall: is the turn that answers a question found, and is it in the request?

Builds long multi-session conversations (30 sessions of chat, ~400 turns each)
in which the user mentions facts about six people (a sister who moved, a
neighbour's new pet, a cousin's new job, ...), some of them about the same
person or the same topic, among generated chat (``_common.ChatText``). At the
end the user asks about them, in other words than they were said ("Where did
my sister move to?" for "Margaret finally moved to Porto in May"). Each
question's evidence is the one turn that stated the fact.

The conversation is stored the way an app would (``conv.add``, then
``conv.window()`` before each user turn, so it compacts as it grows; budget
20,000 tokens, summaries by the offline ``ExtractiveSummarizer``, which only
picks sentences, never repeats facts on purpose). It is built twice: with
recall (convo's default) and without. Reported per backend:

* recall@1/5/10: the evidence among the first k hits of
  ``store.recall(question, conversation_id=...)``, asked before the question is stored;
* the share of questions whose evidence turn is in the request built for them
  (live, or recalled), and whose answer (the fact's key word) is anywhere in
  that request (live turns, summary or recalled turns), with and without recall;
* the tokens recall adds per request and their price as uncached input
  (they ride after the last cache breakpoint).

    python bench/recall.py [--quick] [--record] [--mysql-url URL]
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

from convo import DEFAULT_PRICES, ConversationStore, ExtractiveSummarizer

SESSIONS = 30
QUICK_SESSIONS = 8
CONVERSATIONS = 3
QUICK_CONVERSATIONS = 1

SUBJECTS = [
    ("my sister", "Margaret"),
    ("my brother", "Tomasz"),
    ("my neighbour", "Priya"),
    ("my boss", "Daniel"),
    ("my cousin", "Lena"),
    ("my friend", "Kofi"),
]
CITIES = ["Porto", "Valencia", "Gdansk", "Ljubljana", "Tallinn", "Bergen", "Lyon", "Utrecht"]
PETS = ["greyhound", "parrot", "tortoise", "ferret", "border collie", "siamese cat"]
JOBS = ["pharmacist", "carpenter", "air traffic controller", "translator", "beekeeper"]
CARS = ["Volvo estate", "Fiat Panda", "Skoda Octavia", "Toyota Prius", "Mini Cooper"]
FOODS = ["peanuts", "shellfish", "sesame", "kiwi", "gluten"]
MONTHS = ["January", "March", "May", "July", "September", "November"]
INSTRUMENTS = ["cello", "banjo", "oboe", "accordion", "harp"]
BOOKS = ["The Remains of the Day", "Middlemarch", "Stoner", "The Leopard", "Pachinko"]
COUNTRIES = ["Japan", "Peru", "Iceland", "Morocco", "Vietnam", "Chile"]
VENUES = ["a lighthouse", "a vineyard", "the botanical garden", "an old mill"]
SPORTS = ["rowing", "fencing", "bouldering", "table tennis"]

#: (statement, question, answer slot): {s} the subject phrase, {n} the name, {a} the answer.
TOPICS: list[tuple[str, str, list[str]]] = [
    (
        "{n}, {s}, finally moved to {a} last month; the flat is tiny.",
        "Where did {s} move to?",
        CITIES,
    ),
    (
        "{s} adopted a {a} from the shelter and is besotted with it.",
        "Which animal did {s} adopt?",
        PETS,
    ),
    (
        "Big news: {s} got hired as a {a}, starting next week.",
        "What was {s} hired to work as?",
        JOBS,
    ),
    (
        "{s} bought a second-hand {a}; it rattles on the motorway.",
        "What car does {s} drive these days?",
        CARS,
    ),
    ("Careful with the menu: {s} is badly allergic to {a}.", "What is {s} allergic to?", FOODS),
    (
        "{s} celebrates a birthday in {a}, I must find a present.",
        "In which month is the birthday of {s}?",
        MONTHS,
    ),
    (
        "{s} started taking {a} lessons on Tuesday evenings.",
        "Which instrument lessons is {s} taking?",
        INSTRUMENTS,
    ),
    (
        "{s} recommended the novel {a} to me, apparently it is wonderful.",
        "What novel was recommended to me by {s}?",
        BOOKS,
    ),
    (
        "{s} is planning a long trip to {a} for the spring.",
        "Where is {s} planning to travel?",
        COUNTRIES,
    ),
    (
        "The wedding of {s} will be at {a}, of all places.",
        "Where is the wedding of {s} going to be?",
        VENUES,
    ),
    (
        "{s} joined a {a} club and trains three times a week now.",
        "Which club did {s} join to train?",
        SPORTS,
    ),
]


@dataclass
class Fact:
    statement: str
    question: str
    answer: str
    seq: int = 0  # the evidence turn


@dataclass
class Script:
    turns: list[tuple[str, str, Fact | None]]  # role, text, fact stated
    facts: list[Fact]


def make_script(seed: int, sessions: int) -> Script:
    rng = random.Random(seed)
    users, replies = c.ChatText(seed * 7 + 1), c.ChatText(seed * 7 + 2)
    facts: list[Fact] = []
    for subject, name in SUBJECTS:
        for statement, question, answers in rng.sample(TOPICS, 6):
            answer = rng.choice(answers)
            facts.append(
                Fact(
                    statement.format(s=subject, n=name, a=answer).replace("  ", " "),
                    question.format(s=subject, n=name),
                    answer,
                )
            )
    rng.shuffle(facts)
    pending = list(facts)
    per_session = -(-len(facts) // sessions)
    turns: list[tuple[str, str, Fact | None]] = []
    for day in range(1, sessions + 1):
        stated = [pending.pop() for _ in range(min(per_session, len(pending)))]
        exchanges = rng.randint(5, 8)
        at = set(rng.sample(range(exchanges), min(len(stated), exchanges)))
        for index in range(exchanges):
            fact = stated.pop() if index in at and stated else None
            opener = f"(Day {day}) " if index == 0 else ""
            if fact is not None:
                text = f"{opener}{fact.statement} {users._sentence(18)}"
            else:
                text = opener + users.user()
            turns.append(("user", text, fact))
            turns.append(("assistant", replies.assistant(), None))
    return Script(turns, facts)


@dataclass
class Asked:
    rank: int | None  # 1-based rank of the evidence in store.recall, None if not in the top 10
    evidence_in_request: bool
    answer_in_request: bool
    recall_tokens: int


@dataclass
class Run:
    asked: list[Asked] = field(default_factory=list)
    requests: int = 0
    recall_tokens_all: int = 0  # over every request of the run (chat turns too)
    requests_with_recall: int = 0
    seconds: float = 0.0


def play(url: str, script: Script, *, recall: bool) -> Run:
    """Store ``script`` turn by turn, then ask every question; what was found."""
    run = Run()
    started = time.perf_counter()
    with ConversationStore(
        url, summarizer=ExtractiveSummarizer(), token_budget=c.BUDGET, recall=recall
    ) as store:
        conv = store.create(model=c.MODEL, system=c.system_prompt(600))
        for role, text, fact in script.turns:
            message = conv.add(role, text)
            if fact is not None:
                fact.seq = message.seq
            if role == "user":
                _count(run, conv.window())
        closing = c.ChatText(99)
        for fact in script.facts:
            hits = store.recall(fact.question, conversation_id=conv.id, k=10)
            seqs = [h.seq for h in hits]
            rank = seqs.index(fact.seq) + 1 if fact.seq in seqs else None
            conv.add("user", fact.question)
            window = conv.window()
            _count(run, window)
            live = window.first_seq is not None and window.first_seq <= fact.seq
            recalled = fact.seq in {h.seq for h in window.recalled}
            request = json.dumps(window.params, ensure_ascii=False)
            run.asked.append(
                Asked(rank, live or recalled, fact.answer in request, window.recall_tokens)
            )
            conv.add("assistant", closing.assistant())
    run.seconds = time.perf_counter() - started
    return run


def _count(run: Run, window: Any) -> None:
    run.requests += 1
    run.recall_tokens_all += window.recall_tokens
    run.requests_with_recall += bool(window.recalled)


@contextmanager
def fresh(kind: str, args: Any) -> Iterator[str]:
    if kind == "mysql":
        _empty_mysql(args.mysql_url)
        c.upgrade(args.mysql_url)
        try:
            yield args.mysql_url
        finally:
            _empty_mysql(args.mysql_url)
        return
    with c.fresh_database(kind, args.postgres_url) as url:
        yield url


def _empty_mysql(url: str) -> None:
    from sqlalchemy import create_engine, text

    from convo._database import resolve_url
    from convo._models import Base
    from convo._schema import VERSION_TABLE

    engine = create_engine(resolve_url(url))
    try:
        with engine.begin() as connection:
            Base.metadata.drop_all(connection)
            connection.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))
    finally:
        engine.dispose()


LATENCY_SIZES = (1_000, 10_000, 100_000)
QUICK_LATENCY_SIZES = (1_000, 10_000)
LATENCY_QUERIES = [
    "What did we say about the configuration of the parser and the default encoding?",
    "How do I raise an exception inside a generator?",
    "Remind me what the module does with names and values",
]


def lookup_latency(kind: str, args: Any, sizes: tuple[int, ...]) -> list[str]:
    """p50/p95 of one ``store.recall`` (k=8, conversation scope) on conversations of
    ``sizes`` turns (bulk-inserted as compacted conversations, like context_assembly.py)."""
    pool, system = c.turn_pool(), c.system_prompt()
    cells = []
    for size in sizes:
        with fresh(kind, args) as url, ConversationStore(url, token_budget=c.BUDGET) as store:
            plan = c.plan_conversation(pool, size, system=system)
            cid = c.insert_conversation(store, plan, system=system)
            queries = iter(LATENCY_QUERIES * 100)
            times = c.timed(
                lambda q=queries, i=cid: store.recall(next(q), conversation_id=i, k=8),
                15,
                warmup=3,
            )
            p50, p95 = c.fmt_ms(c.median(times)), c.fmt_ms(c.percentile(times, 95))
            cells.append(f"{p50} / {p95} ms")
    return cells


def share(values: list[bool]) -> str:
    return f"{sum(values) / max(1, len(values)):.0%}"


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--mysql-url",
        default=None,
        help="a MySQL/MariaDB database the benchmark may empty of convo's tables (default: none)",
    )
    args = p.parse_args()
    sessions = QUICK_SESSIONS if args.quick else SESSIONS
    conversations = QUICK_CONVERSATIONS if args.quick else CONVERSATIONS
    postgres_url = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    args.postgres_url = postgres_url
    kinds = c.database_kinds(postgres_url) + (["mysql"] if args.mysql_url else [])
    price = DEFAULT_PRICES[c.MODEL]
    assert price.input is not None
    rows = []
    turns_total = 0
    for kind in kinds:
        on_runs, off_runs = [], []
        for number in range(conversations):
            for recall, runs in ((True, on_runs), (False, off_runs)):
                script = make_script(1_000 + number, sessions)
                turns_total = len(script.turns)
                with fresh(kind, args) as url:
                    runs.append(play(url, script, recall=recall))
            print(f"{kind}: conversation {number + 1} done", flush=True)
        on = [a for r in on_runs for a in r.asked]
        off = [a for r in off_runs for a in r.asked]
        ranks = [a.rank for a in on]
        requests = sum(r.requests for r in on_runs)
        added = sum(r.recall_tokens_all for r in on_runs)
        with_recall = sum(r.requests_with_recall for r in on_runs)
        per_request = added / max(1, requests)
        dollars = per_request * float(price.input) / 1e6
        rows.append(
            [
                kind,
                f"{len(on)}",
                share([r is not None and r <= 1 for r in ranks]),
                share([r is not None and r <= 5 for r in ranks]),
                share([r is not None and r <= 10 for r in ranks]),
                share([a.evidence_in_request for a in off]),
                share([a.evidence_in_request for a in on]),
                share([a.answer_in_request for a in off]),
                share([a.answer_in_request for a in on]),
                f"{with_recall / max(1, requests):.0%}",
                f"{per_request:,.0f}",
                f"${dollars * 1000:.3f}",
            ]
        )
    sizes = QUICK_LATENCY_SIZES if args.quick else LATENCY_SIZES
    latency_rows = []
    for kind in kinds:
        latency_rows.append([kind, *lookup_latency(kind, args, sizes)])
        print(f"{kind}: lookup latency done", flush=True)
    latency = c.table(["backend", *(f"{n:,} turns: p50 / p95" for n in sizes)], latency_rows)
    headers = [
        "backend",
        "questions",
        "recall@1",
        "recall@5",
        "recall@10",
        "evidence in request, recall off",
        "evidence in request, recall on",
        "answer in request, off",
        "answer in request, on",
        "requests with recalled turns",
        "recall tokens per request",
        "recall $ per 1,000 requests",
    ]
    result = c.table(headers, rows)
    print()
    print(result)
    print()
    print(latency)
    if args.record:
        body = "\n".join(
            [
                f"{conversations} conversations of {sessions} sessions ({turns_total} turns "
                "each, then one question per fact), budget "
                f"{c.BUDGET:,} tokens, `{c.MODEL}`, offline `ExtractiveSummarizer`; each "
                "built twice, recall on (default) and off. Questions paraphrase the fact "
                '("Where did my sister move to?" for "Margaret, my sister, finally moved '
                'to Porto last month"); six people share the topics, so most questions '
                "have near-miss turns about the same person or topic. The evidence is the "
                "one user turn that stated the fact. Deterministic: one run.",
                "",
                result,
                "",
                "- *recall@k*: the evidence among the first k of `store.recall(question, "
                "conversation_id=...)`. *evidence in request*: its turn is live in the request "
                "built for the question, or recalled into it. *answer in request*: the fact's "
                "key word is anywhere in that request (live turns, summary, recalled turns).",
                "- *recall tokens per request* averages over every request of the run (chat "
                "turns and questions); they are uncached input (after the last breakpoint), "
                f"priced at ${price.input}/M. The 300-turn cost with recall on and off is in "
                "the cost section.",
                "",
                "Lookup latency: one `store.recall(question, conversation_id=..., k=8)` on a "
                "conversation of N turns of generated chat (three questions in turn):",
                "",
                latency,
                "",
                "- A lookup ranks every turn that matches, so before it runs, each query word's "
                "matches are counted (up to 5,001) and the commonest words are left out once "
                "the matches would pass 5,000 (`_recall.MAX_CANDIDATES`); such words carry "
                "little weight in any ranking.",
                "- MySQL/MariaDB has no stemmer in FULLTEXT: convo adds a crude stem of each "
                "query word (`trams` -> `tram`); its natural-language relevance ranks "
                "differently from bm25 and ts_rank_cd.",
            ]
        )
        c.record("recall", body, postgres_url=postgres_url, command=c.command_line())


if __name__ == "__main__":
    main()
