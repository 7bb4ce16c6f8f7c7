"""Several processes appending to one conversation at once: every turn once, gap-free, in order."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest

from convo import ConversationStore

WRITERS = 6
TURNS_EACH = 25


def _writer(url: str, conversation_id: str, writer: int, barrier: Any, errors: Any) -> None:
    try:
        with ConversationStore(url) as store:
            conv = store.get(conversation_id)
            barrier.wait(timeout=60)
            for turn in range(TURNS_EACH):
                role = "user" if turn % 2 == 0 else "assistant"
                conv.add(role, f"writer {writer} turn {turn}")
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(f"writer {writer}: {type(exc).__name__}: {exc}")
        raise


def _run_writers(url: str, conversation_ids: list[str]) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WRITERS)
    errors = context.Queue()
    processes = [
        context.Process(
            target=_writer,
            args=(url, conversation_ids[w % len(conversation_ids)], w, barrier, errors),
        )
        for w in range(WRITERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    errors.close()
    errors.join_thread()
    assert problems == []
    assert [p.exitcode for p in processes] == [0] * WRITERS


def _check(conv_history: list[Any], writers: list[int]) -> None:
    assert [m.seq for m in conv_history] == list(range(1, len(conv_history) + 1))
    texts = [m.text for m in conv_history]
    expected = {f"writer {w} turn {t}" for w in writers for t in range(TURNS_EACH)}
    assert len(texts) == len(expected)
    assert set(texts) == expected
    for writer in writers:
        mine = [t for t in texts if t.startswith(f"writer {writer} ")]
        assert mine == [f"writer {writer} turn {t}" for t in range(TURNS_EACH)]


@pytest.mark.slow
def test_concurrent_writers_on_one_conversation(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        conv = store.create()
        _run_writers(migrated_url, [conv.id])
        _check(store.get(conv.id).history(), list(range(WRITERS)))
        assert store.get(conv.id).message_count == WRITERS * TURNS_EACH


@pytest.mark.slow
def test_concurrent_writers_on_separate_conversations(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        convs = [store.create() for _ in range(3)]
        _run_writers(migrated_url, [c.id for c in convs])
        for index, conv in enumerate(convs):
            writers = [w for w in range(WRITERS) if w % len(convs) == index]
            _check(store.get(conv.id).history(), writers)


@pytest.mark.slow
def test_first_use_of_the_embedded_database_from_many_processes(tmp_path: Any) -> None:
    # Nobody created it: every writer's store finds it missing and upgrades it.
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    with ConversationStore(url) as store:
        conv_id = store.create().id
    (tmp_path / "fresh.db").unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"fresh.db{suffix}").unlink(missing_ok=True)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WRITERS)
    errors = context.Queue()
    processes = [
        context.Process(target=_open_and_create, args=(url, barrier, errors))
        for _ in range(WRITERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    errors.close()
    errors.join_thread()
    assert problems == []
    with ConversationStore(url) as store:
        assert len(store.list()) == WRITERS
        assert conv_id not in {c.id for c in store.list()}


def _open_and_create(url: str, barrier: Any, errors: Any) -> None:
    try:
        barrier.wait(timeout=60)
        with ConversationStore(url) as store:
            store.create().add("user", "hello")
    except BaseException as exc:
        errors.put(f"{type(exc).__name__}: {exc}")
        raise
