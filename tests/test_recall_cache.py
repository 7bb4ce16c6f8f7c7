"""Recall hits remembered per state of the conversation (``_recall.HitCache``)."""

from __future__ import annotations

from typing import Any

from convo import ConversationStore, ExtractiveSummarizer
from convo._recall import HitCache, RecallHit
from tests.test_recall import filled

_ = filled


def test_a_window_built_again_for_the_same_turn_looks_up_nothing(
    filled: tuple[str, str],
) -> None:
    url, conv_id = filled
    with ConversationStore(url, summarizer=ExtractiveSummarizer()) as store:
        lookups: list[Any] = []
        lookup = store.records.recall_for

        def counted(*args: Any, **kwargs: Any) -> list[RecallHit]:
            lookups.append(args)
            return lookup(*args, **kwargs)

        store.records.recall_for = counted  # type: ignore[method-assign]
        conv = store.get(conv_id)
        conv.add("assistant", "Enjoy!")
        conv.add("user", "Remind me, which dog breed did my sister adopt when she moved?")
        first = conv.window()
        again = conv.window()
        assert first.recalled
        assert again.recalled == first.recalled
        assert again.params == first.params
        assert len(lookups) == 1
        # Any change to the conversation is a new state: looked up again.
        conv.add("assistant", "Greyhounds, I believe.")
        conv.add("user", "And which dog breed did my sister adopt?")
        assert conv.window().recalled
        assert len(lookups) == 2
        conv.edit(conv.message_count, "And which dog did my sister adopt, again?")
        conv.window()
        assert len(lookups) == 3


def test_the_cache_forgets_old_entries_by_age_and_by_count() -> None:
    now = [0.0]
    cache = HitCache(size=2, seconds=10, clock=lambda: now[0])
    hit = RecallHit.__new__(RecallHit)
    cache.put("a", [hit])
    assert cache.get("a") == [hit]
    now[0] = 11
    assert cache.get("a") is None  # too old
    cache.put("a", [])
    cache.put("b", [hit])
    cache.put("c", [hit])
    assert cache.get("a") is None  # the oldest went
    assert cache.get("b") == [hit]
    assert cache.get("c") == [hit]
