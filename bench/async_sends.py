"""100 conversations sending at once from one process: AsyncConversationStore on one loop.

The fake Messages API runs in a process of its own and answers every call
after 200 ms (``--latency``), as a fast real model would. 100 conversations
(``--conversations``) each send 5 turns (``--turns``) one after another, all
conversations at once, through one ``AsyncConversationStore``: first back to
back, then as people chat, each reading a reply for ``--think`` seconds (2)
before the next question. Reported:

* sends per second, over the whole run;
* a send's time, p50/p95, next to a bare ``AsyncAnthropic.messages.create`` of
  the same request at the same concurrency (no convo at all);
* convo's own overhead per send: its time less the time of its API call
  (measured around the call itself), p50/p95;
* the event loop's lag, p99: a task asks to wake every 5 ms and records how
  late it woke. A blocked loop shows here.

    python bench/async_sends.py [--quick] [--record] [--no-postgres] [--pool-size N] [--think S]
"""

from __future__ import annotations

import asyncio
import contextvars
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import anthropic

from convo import AsyncConversationStore

TICK = 0.005
#: Sends of the uncontended run: one conversation, one send after another.
SOLO_TURNS = 30


def _serve(latency: float, urls: Any, stop: Any) -> None:
    from tests.conftest import summarizing_reply
    from tests.fakeapi import FakeMessagesAPI

    with FakeMessagesAPI(reply=summarizing_reply) as fake:
        fake.delay = latency
        urls.put(fake.base_url)
        stop.wait()


class LoopLag:
    """Wakes every TICK seconds and records how late each wake-up was."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + TICK
            await asyncio.sleep(TICK)
            self.lags.append(max(0.0, loop.time() - planned))

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()


#: Where a send's API call puts its duration (tasks convo starts inherit the context).
CALL_SECONDS: contextvars.ContextVar[list[float]] = contextvars.ContextVar("call_seconds")


def time_calls(client: anthropic.AsyncAnthropic) -> None:
    """Make ``client.messages.create`` add its duration to the caller's CALL_SECONDS."""
    original = client.messages.create

    async def create(**params: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(**params)
        finally:
            spent = CALL_SECONDS.get(None)
            if spent is not None:
                spent.append(time.perf_counter() - started)

    client.messages.create = create  # type: ignore[method-assign]


async def _convo_run(
    url: str, base_url: str, conversations: int, turns: int, pool_size: int, think: float = 0.0
) -> dict[str, Any]:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="test-key") as raw:
        time_calls(raw)
        async with AsyncConversationStore(url, client=raw, pool_size=pool_size) as store:
            convs = [await store.create(system="You are terse.") for _ in range(conversations)]
            sends: list[float] = []
            overheads: list[float] = []

            async def talk(index: int) -> None:
                conv = convs[index]
                await _read_reply(index, -1, think)  # people arrive at different times
                for turn in range(turns):
                    spent: list[float] = []
                    CALL_SECONDS.set(spent)
                    started = time.perf_counter()
                    await conv.send(f"conversation {index}, question {turn}", max_tokens=200)
                    elapsed = time.perf_counter() - started
                    sends.append(elapsed)
                    overheads.append(elapsed - sum(spent))
                    await _read_reply(index, turn, think)

            # One warm-up send per conversation: connections, tokenizer, caches.
            await asyncio.gather(*(c_.send("warm up", max_tokens=50) for c_ in convs))
            with LoopLag() as lag:
                started = time.perf_counter()
                await asyncio.gather(*(talk(i) for i in range(conversations)))
                wall = time.perf_counter() - started
            for conv in convs:
                history = await conv.history()
                if len(history) != 2 * (turns + 1) or any(m.status != "complete" for m in history):
                    raise AssertionError(f"{conv.id}: {len(history)} turns stored")
    return {"wall": wall, "sends": sends, "overheads": overheads, "lags": lag.lags}


async def _read_reply(index: int, turn: int, think: float) -> None:
    """A person reading the reply: 0.5 to 1.5 times ``think`` seconds, drawn for each
    conversation and turn (the same in every run), so conversations do not align."""
    if think:
        await asyncio.sleep(think * random.Random(f"{index}/{turn}").uniform(0.5, 1.5))


async def _bare_run(
    base_url: str, conversations: int, turns: int, think: float = 0.0
) -> dict[str, Any]:
    async with anthropic.AsyncAnthropic(base_url=base_url, api_key="test-key") as client:
        calls: list[float] = []

        async def talk(index: int) -> None:
            await _read_reply(index, -1, think)
            for turn in range(turns):
                started = time.perf_counter()
                await client.messages.create(
                    model="claude-sonnet-5-5",
                    max_tokens=200,
                    system="You are terse.",
                    messages=[
                        {"role": "user", "content": f"conversation {index}, question {turn}"}
                    ],
                )
                calls.append(time.perf_counter() - started)
                await _read_reply(index, turn, think)

        await asyncio.gather(*(talk(i) for i in range(conversations)))
        calls.clear()
        with LoopLag() as lag:
            started = time.perf_counter()
            await asyncio.gather(*(talk(i) for i in range(conversations)))
            wall = time.perf_counter() - started
    return {"wall": wall, "sends": calls, "overheads": [], "lags": lag.lags}


def _row(label: str, result: dict[str, Any], total: int) -> list[str]:
    sends, overheads, lags = result["sends"], result["overheads"], result["lags"]
    return [
        label,
        c.fmt_int(total / result["wall"]),
        c.fmt_ms(c.median(sends)),
        c.fmt_ms(c.percentile(sends, 95)),
        c.fmt_ms(c.median(overheads)) if overheads else "-",
        c.fmt_ms(c.percentile(overheads, 95)) if overheads else "-",
        c.fmt_ms(c.percentile(lags, 99)),
    ]


NOTES = """How to read it: at 100 conversations sending back to back against a 200 ms API,
the demand is 500 sends/s, more than one process can serve here even without convo (the
bare SDK's row): convo's send path (the window, counting, SQLAlchemy, the SDK) runs at the
rate in the sends/s column, one core's worth; beyond it, sends queue, and the queueing is
most of the overhead shown. The "one send at a time" rows are convo's own cost per send. The
"people reading" rows are 100 conversations as people hold them: the load one process
carries, where a send's overhead is its own cost plus brief queueing when sends coincide.
The bare SDK's loop lag when 100 responses arrive at once is the SDK's own; convo's async
store adds none on SQLite (its statements run in aiosqlite's threads)."""


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=100)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--latency", type=float, default=0.2, help="seconds per fake API call")
    p.add_argument("--pool-size", type=int, default=20, help="the store's pool_size")
    p.add_argument("--think", type=float, default=2.0, help="seconds a person reads a reply (mean)")
    args = p.parse_args()
    if args.quick:
        args.conversations, args.turns = 20, 2
    postgres = c.prepare_postgres(args.postgres_url, enabled=not args.no_postgres)

    context = mp.get_context("spawn")
    urls, stop = context.Queue(), context.Event()
    server = context.Process(target=_serve, args=(args.latency, urls, stop), daemon=True)
    server.start()
    base_url = urls.get(timeout=60)
    total = args.conversations * args.turns
    rows = []
    try:
        bare = asyncio.run(_bare_run(base_url, args.conversations, args.turns))
        rows.append(_row("bare AsyncAnthropic (no convo)", bare, total))
        for kind in c.database_kinds(postgres):
            with c.fresh_database(kind, postgres) as url:
                result = asyncio.run(
                    _convo_run(url, base_url, args.conversations, args.turns, args.pool_size)
                )
            rows.append(_row(f"convo, {kind}", result, total))
            with c.fresh_database(kind, postgres) as url:
                alone = asyncio.run(_convo_run(url, base_url, 1, SOLO_TURNS, args.pool_size))
            rows.append(_row(f"convo, {kind}, one send at a time", alone, SOLO_TURNS))
        reading = f"people reading {args.think:g} s"
        bare = asyncio.run(_bare_run(base_url, args.conversations, args.turns, args.think))
        rows.append(_row(f"bare AsyncAnthropic, {reading}", bare, total))
        for kind in c.database_kinds(postgres):
            with c.fresh_database(kind, postgres) as url:
                result = asyncio.run(
                    _convo_run(
                        url, base_url, args.conversations, args.turns, args.pool_size, args.think
                    )
                )
            rows.append(_row(f"convo, {kind}, {reading}", result, total))
    finally:
        stop.set()
        server.join(timeout=30)

    headers = [
        "run",
        "sends/s",
        "send p50",
        "send p95",
        "convo overhead p50",
        "overhead p95",
        "loop lag p99",
    ]
    body = (
        f"{args.conversations} conversations x {args.turns} sends at once in one process, "
        f"{args.latency * 1000:.0f} ms per API call (fake API in its own process), "
        f'pool_size={args.pool_size}, default options (recall on). The rows "one send at a '
        f"time\" send {SOLO_TURNS} turns on one conversation, nothing else running: convo's "
        f'own cost per send, without queueing. In the rows "people reading", each of the '
        f"{args.conversations} conversations waits {args.think / 2:g}-{args.think * 1.5:g} s "
        "after a reply before its next question, as a person reading it would.\n\n"
        + c.table(headers, rows)
        + "\n\n"
        + NOTES
    )
    print(body)
    if args.record:
        c.record("async_sends", body, postgres_url=postgres, command=c.command_line())


if __name__ == "__main__":
    main()
