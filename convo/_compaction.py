"""Compaction under any backlog: the decisions, as plain functions over data.

How a backlog of live turns becomes archive blocks and a rolling summary,
whatever its size, while every request stays valid and within budget:

* **Where requests start.** A request carries the summary and the live turns
  from a *window start* on. The start is sticky: it stays put while the turns
  from it fit the budget, and when they no longer do it jumps to the low-water
  mark (:func:`choose_start`). Live turns before it that are not archived yet
  (a backlog, or a summarizer that is down) are stored but not sent, and the
  window's notes say so. Because the start moves rarely, consecutive requests
  share their prefix even while summaries fail.
* **Chunks.** Everything before the start is archived in chunks: the previous
  summary plus the next oldest turns, at most ``summarizer_input_tokens`` in
  all, cut only at safe starts (:func:`next_chunk`). A single exchange bigger
  than that is one chunk of its own (the summarizer's transcript bounds it).
  At most one chunk is summarized before one request; ``conv.compact()`` loops
  until the backlog is done. Each chunk commits on its own.
* **Failures** (:class:`Backoff`). A failed summary is retried with
  exponential backoff (30 s, 1 min, 2 min, ... up to 10 min), persisted on the
  conversation so it holds across processes; turns wait meanwhile. After
  :data:`FALLBACK_AFTER_FAILURES` consecutive failures the offline extractive
  summary stands in for each chunk until the summarizer answers again (it is
  still tried whenever its backoff ends). A configured ``summarizer_fallback``
  steps in at once, at the first failure.
* **"Prompt is too long"** from the summarizer model halves the chunk (at a
  safe start) and tries again at once; it is not a failure.
* **The summary's size.** A summary gets at most :data:`SUMMARY_SHARE` of the
  budget, given to the summarizer as ``target_tokens``. A longer one is
  re-summarized shorter once, then cut to the cap. A request whose summary and
  newest exchange do not fit together carries the summary cut to what fits
  (:func:`clip_text`), or none; that never raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from ._bridge import off_loop, rough_size
from ._summarizer import SummaryResult, SummaryTurn
from ._window import LiveTurn, safe_starts

__all__ = [
    "DEFAULT_SUMMARIZER_INPUT_TOKENS",
    "FALLBACK_AFTER_FAILURES",
    "MAX_BLOCK_BYTES",
    "MAX_BLOCK_TURNS",
    "SUMMARY_SHARE",
    "Backoff",
    "ChunkSummary",
    "choose_start",
    "clip_text",
    "is_prompt_too_long",
    "next_chunk",
    "summarize_chunk",
    "summary_target",
]

logger = logging.getLogger("convo")

#: Default bound of one summarizer request (previous summary + turns), in raw
#: tokens: well inside the summarizer model's context (Haiku 5.5: 1M tokens,
#: 200K on older ones) and cheap enough to retry.
DEFAULT_SUMMARIZER_INPUT_TOKENS: Final = 60_000
#: What the summarizer's prompt and instructions add to one request.
SUMMARIZER_OVERHEAD_TOKENS: Final = 1_000
#: What the transcript's framing ("ASSISTANT (turn 12345): ") adds per turn,
#: beyond the turn's own count.
TRANSCRIPT_TURN_TOKENS: Final = 10
#: The summary may use at most this share of a request's budget.
SUMMARY_SHARE: Final = 0.15
MIN_SUMMARY_TOKENS: Final = 64
MAX_SUMMARY_TOKENS: Final = 8_000
#: A summary up to this much over its target is kept as it is.
SUMMARY_SLACK: Final = 1.25
#: Backoff after the n-th consecutive failure: BASE * 2**(n-1), at most MAX.
RETRY_BASE_SECONDS: Final = 30.0
RETRY_MAX_SECONDS: Final = 600.0
#: After this many consecutive failures the extractive summary stands in.
FALLBACK_AFTER_FAILURES: Final = 3
#: An archive block holds at most this many turns and this many bytes of JSON
#: (a bigger single turn is a block of its own), so reading history is linear.
MAX_BLOCK_TURNS: Final = 500
MAX_BLOCK_BYTES: Final = 1 << 20
#: Rows read per round trip when reading the newest live turns (newest first)
#: and the oldest chunk (oldest first).
TAIL_BATCH: Final = 128
CHUNK_BATCH: Final = 1_000


# -- sizes ------------------------------------------------------------------------


def summary_target(budget_tokens: int) -> int:
    """Tokens a summary may use in a request of ``budget_tokens`` (raw tokens)."""
    return max(MIN_SUMMARY_TOKENS, min(MAX_SUMMARY_TOKENS, int(budget_tokens * SUMMARY_SHARE)))


def clip_text(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """``text`` cut at a line or word end so that ``count`` of it is at most ``max_tokens``.

    Binary search over the length: O(log n) counts. Ends with a marker saying
    it was cut; empty if not even that fits.
    """
    marker = "\n[... summary cut to fit the token budget]"
    if count(text) <= max_tokens:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid] + marker) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return ""
    cut = text[:lo]
    for sep in ("\n", " "):
        at = cut.rfind(sep)
        if at > lo // 2:
            cut = cut[:at]
            break
    return cut.rstrip() + marker


# -- where requests start, and what the next chunk is ---------------------------------


def _starts(turns: Sequence[LiveTurn], *, first_is_start: bool) -> list[int]:
    starts = [i for i in safe_starts(turns) if i > 0]
    return [0, *starts] if first_is_start else starts


def _before(turns: Sequence[LiveTurn], starts: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Each start index with the tokens of the turns before it."""
    used = 0
    previous = 0
    for index in starts:
        used += sum(t.tokens for t in turns[previous:index])
        previous = index
        yield index, used


def choose_start(
    tail: Sequence[LiveTurn], *, reached_start: bool, available: int, low_water: int
) -> int:
    """Index in ``tail`` (the newest live turns, oldest first) where the request starts.

    ``reached_start`` says ``tail[0]`` is the current window start (the reader
    got that far without passing ``available``). While the turns fit in
    ``available`` the start stays (0); else it moves to the earliest safe start
    whose turns use at most ``low_water``, or, if none does, to the newest
    exchange.
    """
    total = sum(t.tokens for t in tail)
    if reached_start and total <= available:
        return 0
    starts = _starts(tail, first_is_start=False)
    for index, before in _before(tail, starts):
        if total - before <= low_water:
            return index
    return starts[-1] if starts else 0


def tail_is_enough(tail: Sequence[LiveTurn], available: int) -> bool:
    """Whether the newest turns read so far are enough for :func:`choose_start`."""
    return sum(t.tokens for t in tail) > available and bool(_starts(tail, first_is_start=False))


def newest_exchange(turns: Sequence[LiveTurn]) -> int:
    """Index of the newest exchange's first turn (0 if there is no later safe start)."""
    starts = _starts(turns, first_is_start=False)
    return starts[-1] if starts else 0


def next_chunk(turns: Sequence[LiveTurn], *, allowance: int, reached_end: bool) -> int:
    """How many of ``turns`` (the oldest live turns) form the next chunk.

    The most turns whose tokens fit ``allowance``, ending right before a safe
    start (or at the end, when ``reached_end``: the turn after is the window
    start). If even the first exchange is bigger, it is the chunk alone.
    """
    starts = _starts(turns, first_is_start=False)
    if reached_end:
        starts.append(len(turns))
    best = 0
    for index, before in _before(turns, starts):
        if before + index * TRANSCRIPT_TURN_TOKENS > allowance:
            break
        best = index
    if best == 0:
        best = starts[0] if starts else len(turns)
    return best


def chunk_is_enough(turns: Sequence[LiveTurn], allowance: int) -> bool:
    """Whether the oldest turns read so far are enough for :func:`next_chunk`."""
    used = sum(t.tokens for t in turns) + len(turns) * TRANSCRIPT_TURN_TOKENS
    return used > allowance and bool(_starts(turns, first_is_start=False))


def chunk_allowance(input_tokens: int, previous_tokens: int) -> int:
    """Raw tokens of turns one summarizer request may carry besides the previous summary."""
    return max(input_tokens - previous_tokens - SUMMARIZER_OVERHEAD_TOKENS, input_tokens // 4)


# -- failures -----------------------------------------------------------------------


def now() -> datetime:
    """The time backoff is measured in (UTC; tests replace it with a fake clock)."""
    return datetime.now(UTC)


Attempt = Literal["primary", "fallback", "wait"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """A conversation's summarizer failures, as persisted on its row."""

    failures: int = 0
    retry_at: datetime | None = None

    def attempt(self, now: datetime) -> Attempt:
        """What to do for the next chunk now.

        ``primary``: ask the summarizer (first try, or its backoff has ended);
        ``fallback``: it keeps failing and is backing off: the extractive
        summary makes this chunk; ``wait``: it failed recently; leave the
        turns live (and out of the request) until the backoff ends.
        """
        if self.failures == 0 or self.retry_at is None or now >= self.retry_at:
            return "primary"
        return "fallback" if self.failures >= FALLBACK_AFTER_FAILURES else "wait"

    def failed(self, now: datetime) -> Backoff:
        failures = self.failures + 1
        delay = min(RETRY_BASE_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)
        return Backoff(failures, now + timedelta(seconds=delay))

    @property
    def falls_back(self) -> bool:
        """Whether a chunk the summarizer failed on goes to the extractive summary."""
        return self.failures >= FALLBACK_AFTER_FAILURES


def is_prompt_too_long(exc: BaseException) -> bool:
    """The SDK's 400 for a summarizer request over the model's context window."""
    return getattr(exc, "status_code", None) == 400 and "prompt is too long" in str(exc).lower()


# -- summarizing one chunk ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkSummary:
    """A summary of the first ``count`` turns of a chunk."""

    result: SummaryResult
    count: int
    #: The primary summarizer's failure, if it was asked and failed.
    failure: str | None = None
    fell_back: bool = False
    #: Times the chunk was halved because the prompt was too long.
    splits: int = 0


class SummaryNotMade(Exception):
    """No summarizer produced a summary for the chunk; ``failure`` says why."""

    def __init__(self, failure: str) -> None:
        super().__init__(failure)
        self.failure = failure


def _describe(summarizer: object, exc: BaseException) -> str:
    return f"{type(summarizer).__name__}: {type(exc).__name__}: {exc}"


def _as_result(made: str | SummaryResult) -> SummaryResult:
    result = made if isinstance(made, SummaryResult) else SummaryResult(str(made))
    # A summary is derived text, not history: NULs (which PostgreSQL's text
    # cannot hold) may go.
    return replace(result, text=result.text.replace("\x00", "\ufffd"))


def _halve(turns: Sequence[LiveTurn], count: int) -> int:
    """A safe cut at about half the tokens of ``turns[:count]``; 0 if there is none."""
    half = sum(t.tokens for t in turns[:count]) / 2
    best = 0
    for index, before in _before(turns, _starts(turns[:count], first_is_start=False)):
        if best and before > half:
            break
        best = index
    return best


#: Summarizing a character in process costs about this many times counting it (the
#: extractive summarizer, measured): how ``off_loop`` weighs a summary's input.
SUMMARY_WORK_PER_CHAR: Final = 8


def summarize(
    summarizer: object, previous: str | None, turns: Sequence[SummaryTurn], target_tokens: int
) -> SummaryResult:
    """``summarizer.summarize(...)``; one that is ``cpu_bound`` (it computes the summary
    in this process, as :class:`ExtractiveSummarizer` does) runs off the async store's
    event loop when the text is large (``_bridge.off_loop``)."""
    call = summarizer.summarize  # type: ignore[attr-defined]
    if not getattr(summarizer, "cpu_bound", False):
        return _as_result(call(previous, turns, target_tokens=target_tokens))
    size = len(previous or "") + rough_size([turn.content for turn in turns])
    work = size * SUMMARY_WORK_PER_CHAR
    return _as_result(off_loop(call, work, previous, turns, target_tokens=target_tokens))


def summarize_chunk(
    turns: Sequence[LiveTurn],
    previous: str | None,
    *,
    target_tokens: int,
    primary: object | None,
    fallback: object | None,
    count: Callable[[str], int],
    redact: Callable[[SummaryTurn], SummaryTurn] | None = None,
) -> ChunkSummary:
    """Summarize ``turns`` (or a safe prefix of them) with ``previous``.

    ``primary`` is asked first (None: skip it, it is backing off); on "prompt
    is too long" the chunk is halved and it is asked again. If it fails,
    ``fallback`` (None: none now) makes the summary. The summary is capped at
    ``target_tokens`` (with :data:`SUMMARY_SLACK`): re-summarized shorter by the
    summarizer that made it, then cut. ``redact`` makes each turn as a
    summarizer may see it. Raises :class:`SummaryNotMade`.
    """
    size = len(turns)
    failure: str | None = None
    splits = 0
    made: SummaryResult | None = None
    used: object | None = None
    if primary is not None:
        while True:
            try:
                made = summarize(primary, previous, _handed(turns[:size], redact), target_tokens)
            except Exception as exc:
                smaller = _halve(turns, size) if is_prompt_too_long(exc) else 0
                if smaller:
                    logger.info("summarizer prompt too long for %d turns; trying %d", size, smaller)
                    size, splits = smaller, splits + 1
                    continue
                failure = _describe(primary, exc)
                made = None
            break
        if made is not None and not made.text.strip():
            failure, made = f"{type(primary).__name__}: returned an empty summary", None
        used = primary if made is not None else None
    if made is None and fallback is not None:
        size = len(turns)
        try:
            made = summarize(fallback, previous, _handed(turns, redact), target_tokens)
        except Exception as exc:
            failure = "; ".join(filter(None, [failure, _describe(fallback, exc)]))
            made = None
        if made is not None and not made.text.strip():
            failure = "; ".join(filter(None, [failure, "the fallback returned an empty summary"]))
            made = None
        used = fallback if made is not None else None
    if made is None:
        raise SummaryNotMade(failure or "no summarizer was available")
    return ChunkSummary(
        _capped(made, used, target_tokens, count), size, failure, used is fallback, splits
    )


def _handed(
    turns: Sequence[LiveTurn], redact: Callable[[SummaryTurn], SummaryTurn] | None
) -> list[SummaryTurn]:
    handed = [SummaryTurn(t.seq, t.role, t.content) for t in turns]
    return handed if redact is None else [redact(turn) for turn in handed]


def _capped(
    result: SummaryResult, summarizer: object, target: int, count: Callable[[str], int]
) -> SummaryResult:
    limit = int(target * SUMMARY_SLACK)
    if count(result.text) <= limit:
        return result
    try:
        shorter = summarize(summarizer, result.text, [], max(target // 2, 1))
        if shorter.text.strip() and count(shorter.text) < count(result.text):
            result = replace(shorter, usage=_merged_usage(result.usage, shorter.usage))
    except Exception as exc:
        logger.warning("re-summarizing shorter failed (%s); the summary is cut instead", exc)
    if count(result.text) > limit:
        result = replace(result, text=clip_text(result.text, limit, count))
    return result


def _merged_usage(
    first: dict[str, object] | None, second: dict[str, object] | None
) -> dict[str, object] | None:
    if not first or not second:
        return first or second
    merged = dict(first)
    for key, value in second.items():
        if isinstance(value, int) and isinstance(merged.get(key), int):
            merged[key] = int(merged[key]) + value  # type: ignore[call-overload]
        else:
            merged.setdefault(key, value)
    return merged


def has_start(turns: Sequence[LiveTurn]) -> bool:
    """Whether the newest turns read so far hold the newest exchange's start."""
    return bool(_starts(turns, first_is_start=False))


def after_failed_turns(turns: Sequence[LiveTurn]) -> int:
    """Index of the newest user turn that follows a failed user turn (0: none).

    Such a pair is one unit for the window (the failed turn is resent); when
    the unit cannot fit, the request starts here instead.
    """
    for index in range(len(turns) - 1, 0, -1):
        before, turn = turns[index - 1], turns[index]
        if (
            before.role == "user"
            and before.status == "failed"
            and turn.role == "user"
            and not any(b.get("type") == "tool_result" for b in turn.content)
        ):
            return index
    return 0
