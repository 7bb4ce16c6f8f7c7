"""What only the async API has: cancellation, the loop, the client, mixing with sync.

Everything the two APIs share is proven once, by the `faces` tests, which run
against both. These tests are written with ``async``/``await`` as an app would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anthropic
import pytest

from convo import (
    AsyncConversation,
    AsyncConversationStore,
    ConversationBusy,
    ConversationStore,
    ExtractiveSummarizer,
    InvalidInput,
    SummaryResult,
    SummaryTurn,
)
from convo._bridge import OFF_LOOP_BYTES
from convo._compaction import SUMMARY_WORK_PER_CHAR
from convo._tokens import TiktokenCounter
from tests.fakeapi import FakeMessagesAPI

T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await main()

    return asyncio.run(wrapper())


@pytest.fixture
def new_client(fake_api: FakeMessagesAPI) -> Callable[[], anthropic.AsyncAnthropic]:
    """Makes an ``AsyncAnthropic`` for the fake; open it inside the test's event loop."""
    return lambda: anthropic.AsyncAnthropic(base_url=fake_api.base_url, api_key="test-key")


@contextlib.asynccontextmanager
async def opened(
    url: str, new_client: Any, **options: Any
) -> AsyncIterator[AsyncConversationStore]:
    """An async store on ``url`` with a client for the fake, both closed after."""
    async with (
        new_client() as client,
        AsyncConversationStore(url, client=client, **options) as store,
    ):
        yield store


def _statuses(url: str, conversation_id: str) -> list[tuple[str, str]]:
    with ConversationStore(url) as store:
        return [(m.role, m.status) for m in store.get(conversation_id).history()]


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_cancelled_send_keeps_the_user_turn_and_releases_the_claim(
    migrated_url: str, fake_api: FakeMessagesAPI, new_client: Any, how: str
) -> None:
    fake_api.delay = 5.0

    async def main() -> str:
        async with opened(migrated_url, new_client) as store:
            conv = await store.create()
            if how == "timeout":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await conv.send("first question")
            else:
                task = asyncio.create_task(conv.send("first question"))
                await asyncio.sleep(0.5)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            fake_api.delay = 0.0
            # The claim is gone: the next send goes through, and resends the first turn.
            reply = await conv.send("second question")
            assert "first question" in str(fake_api.requests[-1].body["messages"])
            assert reply.status == "complete"
            return conv.id

    conversation_id = run(main)
    assert _statuses(migrated_url, conversation_id) == [
        ("user", "failed"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_cancelled_stream_keeps_the_partial_reply_as_incomplete(
    migrated_url: str, fake_api: FakeMessagesAPI, new_client: Any, how: str
) -> None:
    fake_api.stream_event_delay = 0.05
    fake_api.stream_chunk_chars = 2
    received: list[str] = []

    async def read(conv: AsyncConversation) -> None:
        async with conv.stream("tell me a long story about a tram") as reply:
            async for text in reply:
                received.append(text)

    async def main() -> str:
        async with opened(migrated_url, new_client) as store:
            conv = await store.create()
            if how == "timeout":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.6):
                        await read(conv)
            else:
                task = asyncio.create_task(read(conv))
                while len(received) < 3:
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert received
            history = await conv.history()
            assert [m.status for m in history] == ["complete", "incomplete"]
            assert history[1].text == "".join(received)
            assert history[1].usage is not None  # what message_start reported, billed all the same
            fake_api.stream_event_delay = 0.0
            await conv.send("go on")  # the claim was released
            return conv.id

    conversation_id = run(main)
    assert [s for _, s in _statuses(migrated_url, conversation_id)] == [
        "complete",
        "incomplete",
        "complete",
        "complete",
    ]


def test_an_async_and_a_sync_sender_exclude_each_other(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic, new_client: Any
) -> None:
    fake_api.delay = 1.5
    with ConversationStore(migrated_url, client=api_client) as sync_store:
        conv = sync_store.create()
        sender = threading.Thread(target=conv.send, args=("from the sync side",))
        sender.start()
        try:
            deadline = time.monotonic() + 10
            # The user turn and the claim are written together, before the call.
            while sync_store.get(conv.id).message_count < 1 and time.monotonic() < deadline:
                time.sleep(0.01)

            async def main() -> None:
                async with opened(migrated_url, new_client) as store:
                    async_conv = await store.get(conv.id)
                    with pytest.raises(ConversationBusy):
                        await async_conv.send("from the async side")

            run(main)
        finally:
            sender.join()

    async def main_async_first() -> None:
        async with opened(migrated_url, new_client) as store:
            async_conv = await store.get(conv.id)
            task = asyncio.create_task(async_conv.send("async holds it"))
            while (await store.get(conv.id)).message_count < 3:
                await asyncio.sleep(0.01)
            with (
                ConversationStore(migrated_url, client=api_client) as other,
                pytest.raises(ConversationBusy),
            ):
                await asyncio.to_thread(other.get(conv.id).send, "sync is refused")
            await task

    run(main_async_first)
    assert _statuses(migrated_url, conv.id) == [("user", "complete"), ("assistant", "complete")] * 2


def test_many_conversations_send_concurrently_on_one_loop(
    migrated_url: str, fake_api: FakeMessagesAPI, new_client: Any
) -> None:
    fake_api.delay = 0.3

    async def main() -> tuple[float, list[AsyncConversation]]:
        async with opened(migrated_url, new_client) as store:
            convs = [await store.create(title=f"c{i}") for i in range(12)]
            started = time.monotonic()
            replies = await asyncio.gather(*(c.send(f"hello {c.title}") for c in convs))
            elapsed = time.monotonic() - started
            for conv, reply in zip(convs, replies, strict=True):
                assert reply.text == f"echo: hello {conv.title}"
            return elapsed, convs

    elapsed, convs = run(main)
    # Twelve 0.3 s calls one after another would take 3.6 s: they overlapped.
    assert elapsed < 12 * 0.3
    for conv in convs:
        assert len(_statuses(migrated_url, conv.id)) == 2


def test_the_store_limits_concurrent_requests_across_conversations(
    migrated_url: str, fake_api: FakeMessagesAPI, new_client: Any
) -> None:
    fake_api.delay = 0.2
    running = peak = 0

    async def main() -> None:
        async with new_client() as client:
            original = client.messages.create

            async def counting_create(**params: Any) -> Any:
                nonlocal running, peak
                running += 1
                peak = max(peak, running)
                try:
                    return await original(**params)
                finally:
                    running -= 1

            client.messages.create = counting_create  # type: ignore[method-assign]
            async with AsyncConversationStore(
                migrated_url, client=client, max_concurrent_requests=2
            ) as store:
                convs = [await store.create() for _ in range(6)]
                await asyncio.gather(*(c.send("hi") for c in convs))

    run(main)
    assert peak == 2


def test_a_long_turn_is_counted_off_the_event_loop(migrated_url: str) -> None:
    threads: list[tuple[int, bool]] = []

    class Recording(TiktokenCounter):
        def count(self, text: str) -> int:
            threads.append((len(text), threading.current_thread() is threading.main_thread()))
            return super().count(text)

    long_text = "word " * (OFF_LOOP_BYTES // 5 + 1000)

    async def main() -> None:
        async with AsyncConversationStore(migrated_url, token_counter=Recording()) as store:
            conv = await store.create()
            threads.clear()
            await conv.add("user", "short")
            await conv.add("assistant", long_text)

    run(main)
    on_loop = {size >= OFF_LOOP_BYTES: main for size, main in threads}
    assert on_loop == {False: True, True: False}


def test_the_extractive_summarizer_runs_off_the_event_loop(migrated_url: str) -> None:
    """A chunk of tens of thousands of tokens takes the offline summarizer a few
    hundred ms: a large one goes to a worker thread; a small one stays on the loop."""
    threads: list[tuple[int, bool]] = []

    class Recording(ExtractiveSummarizer):
        def summarize(
            self, previous: str | None, turns: Sequence[SummaryTurn], *, target_tokens: int
        ) -> SummaryResult:
            size = sum(len(str(turn.content)) for turn in turns)
            threads.append((size, threading.current_thread() is threading.main_thread()))
            return super().summarize(previous, turns, target_tokens=target_tokens)

    async def main() -> None:
        async with AsyncConversationStore(migrated_url, summarizer=Recording()) as store:
            small, large = await store.create(), await store.create()
            await small.extend([("user", "a short question"), ("assistant", "a short answer")])
            await small.add("user", "next")
            await small.compact()
            # Large enough for the summary's work to go to a thread.
            words = "the tram timetable changes on Sundays. " * (OFF_LOOP_BYTES // 300)
            await large.extend([("user", words), ("assistant", words)])
            await large.add("user", "next")
            await large.compact()

    run(main)
    heavy = OFF_LOOP_BYTES // SUMMARY_WORK_PER_CHAR
    on_loop = {size >= heavy: main for size, main in threads if size}
    assert on_loop == {False: True, True: False}


def test_an_async_summarizer_is_awaited(migrated_url: str) -> None:
    calls: list[int] = []

    class AsyncSummarizer:
        name = "async-test"

        async def summarize(
            self, previous: str | None, turns: list[SummaryTurn], *, target_tokens: int
        ) -> SummaryResult:
            await asyncio.sleep(0)
            calls.append(len(turns))
            return SummaryResult(text=f"{len(turns)} turns about trams.", summarizer=self.name)

    async def main() -> None:
        async with AsyncConversationStore(
            migrated_url, token_budget=1_500, summarizer=AsyncSummarizer()
        ) as store:
            conv = await store.create()
            for i in range(40):
                await conv.add("user", f"question {i} about the tram network " * 5)
                await conv.add("assistant", f"answer {i} about the timetable " * 5)
            await conv.window()
            summary = await conv.summary()
            assert summary is not None
            assert "turns about trams" in summary

    run(main)
    assert calls


def test_a_sync_client_is_refused_with_a_clear_error(
    migrated_url: str, api_client: anthropic.Anthropic
) -> None:
    with pytest.raises(InvalidInput, match=r"client.*AsyncAnthropic"):
        AsyncConversationStore(migrated_url, client=api_client)


def test_bad_options_are_refused_before_any_await(migrated_url: str) -> None:
    with pytest.raises(InvalidInput, match="low_water"):
        AsyncConversationStore(migrated_url, low_water=2.0)


def test_aclose_closes_the_pool_and_the_store_can_be_reopened(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"

    async def main() -> None:
        store = AsyncConversationStore(url)
        conv = await store.create(title="kept")
        await conv.add("user", "hello")
        await store.aclose()
        async with AsyncConversationStore(url) as again:
            found = await again.get(conv.id)
            assert found.title == "kept"
            assert [m.text async for m in found.iter_history()] == ["hello"]
            assert [c.id async for c in again.iter_conversations()] == [conv.id]

    run(main)
