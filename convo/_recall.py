"""Ranked recall: what to ask the full-text index, and which earlier turns go into a request.

Plain functions over data. The store runs the query (``_search.recall``);
``Conversation.window()`` calls :func:`plan` and :func:`attach` around
``assemble``.

Before each request, the newest user turn's words (stop words dropped, at
most :data:`MAX_QUERY_TERMS` of them) are looked up in the stemmed index of
the conversation's turns (or of every conversation of its user, with
``recall_scope="user"``), leaving out the turns the request already
carries. The hits that pass the relevance threshold go in, best first,
until the recall allowance (``recall_share`` of the budget, 10% by
default) is used, as one text block at the very end of the newest user
message, *after* its cache breakpoint: the cached prefix never changes.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from ._content import Block
from .errors import InvalidInput

if TYPE_CHECKING:
    from ._budget import Calibration
    from ._window import ContextWindow

__all__ = ["RecallHit"]

#: Recall on by default: it adds no cache writes and costs a few % (bench/RESULTS.md).
DEFAULT_RECALL: Final = True
DEFAULT_SHARE: Final = 0.10
DEFAULT_K: Final = 10
#: Hits asked for before each request (the threshold and the allowance cut further).
REQUEST_K: Final = 8
#: A query is cut to this many characters before it is split into words...
MAX_QUERY_CHARS: Final = 4_000
#: ...and to this many distinct words (stop words dropped).
MAX_QUERY_TERMS: Final = 32
#: A hit goes into a request only if its score is at least this share of the best hit's
#: (scores are on each backend's own scale) and it has at least this share of the
#: query's distinct word stems (at least min(MIN_SHARED_TERMS, query terms) of them).
RELATIVE_THRESHOLD: Final = 0.35
MIN_COVERAGE: Final = 0.5
MIN_SHARED_TERMS: Final = 2
#: A recalled turn longer than this many tokens is cut (marked ``…``).
MAX_HIT_TOKENS: Final = 300
#: Below this many tokens left in the allowance, no further hit is cut to fit.
MIN_HIT_TOKENS: Final = 40
SCOPES: Final = ("conversation", "user")
RECALL_HEADER: Final = (
    "[Recalled by convo: earlier turns that may be relevant to the message above. "
    "They are from the stored history, not part of the live conversation; "
    "turn numbers and dates are where they were said.]"
)

# A plain English stop word list (words that carry no topic), applied on every
# backend so the engines see the same words; each engine may drop more.
STOP_WORDS: Final = frozenset(
    """a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't down during each few for from further had hadn't has hasn't have
    haven't having he he'd he'll he's her here here's hers herself him himself his how how's i
    i'd i'll i'm i've if in into is isn't it it's its itself let's me more most mustn't my myself
    no nor not of off on once only or other ought our ours ourselves out over own same shan't
    she she'd she'll she's should shouldn't so some such than that that's the their theirs
    them themselves then there there's these they they'd they'll they're they've this those
    through to too under until up very was wasn't we we'd we'll we're we've were weren't what
    what's when when's where where's which while who who's whom why why's with won't would
    wouldn't you you'd you'll you're you've your yours yourself yourselves s t d ll m re ve
    also just did does get got ok okay yes please thanks thank tell know remember said say
    """.replace("'", " ").split()
)
_WORD: Final = re.compile(r"\w+", re.UNICODE)
_SUFFIXES: Final = ("ingly", "edly", "ings", "ing", "ies", "ied", "ed", "es", "ly", "s")


@dataclass(frozen=True, slots=True)
class RecallHit:
    """One turn found by ranked recall. ``score``: higher is more relevant, on the
    backend's own scale (FTS5 ``-bm25``, PostgreSQL ``ts_rank_cd``, MySQL/MariaDB
    natural-language relevance), so compare scores only within one result."""

    conversation_id: str
    seq: int
    role: str
    created_at: datetime
    score: float
    snippet: str
    #: The turn's searchable text (text, tool calls and results), whole.
    text: str = ""


def query_terms(query: object) -> list[str]:
    """The distinct words of ``query`` worth looking up, lowercased, in order.

    Raises :class:`InvalidInput` if ``query`` is not a string or has no word
    at all; a query of stop words only gives ``[]`` (and an empty result).
    """
    if not isinstance(query, str):
        raise InvalidInput("query", f"must be a string, not {type(query).__name__}")
    words = _WORD.findall(query[:MAX_QUERY_CHARS].lower())
    if not words:
        raise InvalidInput("query", "needs at least one word to search for")
    terms: list[str] = []
    for word in words:
        if word in STOP_WORDS or word in terms or (len(word) == 1 and not word.isdigit()):
            continue
        terms.append(word)
        if len(terms) == MAX_QUERY_TERMS:
            break
    return terms


#: Matches a lookup may rank at most (about): the cost of a lookup is the ranking of
#: its matches, so the commonest words go first when a query would match more turns.
MAX_CANDIDATES: Final = 5_000


def rarest_terms(terms: Sequence[str], matches: Sequence[int]) -> list[str]:
    """``terms`` (in their order) without the commonest, so that at most about
    :data:`MAX_CANDIDATES` turns match; the rarest term that matches is always kept.

    ``matches[i]`` is how many turns ``terms[i]`` matches (counted up to
    ``MAX_CANDIDATES + 1``). A word that common tells few turns apart: every
    ranking function gives it little weight.
    """
    kept: set[int] = set()
    total = 0
    # Counts stop at the cap: among words that common, the longer is likely the rarer.
    for index in sorted(range(len(terms)), key=lambda i: (matches[i], -len(terms[i]))):
        if matches[index] == 0:
            continue
        if kept and total + matches[index] > MAX_CANDIDATES:
            break
        kept.add(index)
        total += matches[index]
    return [term for index, term in enumerate(terms) if index in kept]


@functools.lru_cache(maxsize=65_536)
def light_stem(word: str) -> str:
    """A crude English stem: the common suffixes cut (``trams``, ``tram`` -> ``tram``).

    Remembered: the hits of every request are stemmed word by word, and words repeat.
    """
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 4 else word


def with_variants(terms: Sequence[str]) -> list[str]:
    """``terms`` and their crude stems, for an index without a stemmer (MySQL/MariaDB)."""
    out: list[str] = []
    for term in terms:
        for variant in (term, light_stem(term)):
            if variant not in out:
                out.append(variant)
    return out


def shared_terms(terms: Sequence[str], text: str) -> int:
    """How many of ``terms`` (by crude stem) occur in ``text``."""
    stems = {light_stem(w) for w in _WORD.findall(text.lower())}
    return sum(1 for term in {light_stem(t) for t in terms} if term in stems)


# -- recall before a request --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecallQuery:
    """What to look up for the next request, and where."""

    terms: tuple[str, ...]
    conversation_id: str | None  # None: every conversation of user_id
    user_id: str | None
    #: Turns of this conversation from this seq on are in the request: not recalled.
    exclude_conversation: str
    exclude_from_seq: int
    allowance: int  # raw tokens

    def outside(self, window: ContextWindow) -> RecallQuery:
        """This lookup, leaving out the turns ``window`` carries."""
        first = window.first_seq if window.first_seq is not None else self.exclude_from_seq
        return replace(self, exclude_from_seq=first)


def newest_user_text(turns: Sequence[Any]) -> str | None:
    """The text of the newest user turn that says something (not only tool results)."""
    for turn in reversed(turns):
        if turn.role != "user":
            continue
        parts = [
            str(b.get("text", ""))
            for b in turn.content
            if b.get("type") == "text" and str(b.get("text", "")).strip()
        ]
        if parts:
            return "\n".join(parts)
    return None


def reserve(
    *,
    enabled: bool,
    budget: int,
    share: float,
    factor: float,
    archived_through_seq: int,
    live_tokens: int,
    scope: str,
    user_id: str | None,
) -> int:
    """Raw tokens kept free for recalled turns out of a calibrated ``budget``.

    Nothing while every turn of the conversation can be in the request (nothing
    archived, live turns within the budget), unless it may recall from its
    user's other conversations.
    """
    if not enabled:
        return 0
    everything_sent = archived_through_seq == 0 and live_tokens * factor <= budget
    if everything_sent and not (scope == "user" and user_id):
        return 0
    return int(budget * share / factor)


def plan(
    *,
    turns: Sequence[Any],
    conversation_id: str,
    user_id: str | None,
    scope: str,
    reserve: int,
) -> RecallQuery | None:
    """The lookup to make before a request, or None if there is nothing to recall.

    ``turns`` are the live turns; ``reserve`` the allowance in raw tokens.
    """
    if reserve <= 0 or not turns or turns[-1].role != "user":
        return None
    by_user = scope == "user" and user_id is not None
    text = newest_user_text(turns)
    if text is None:
        return None
    try:
        terms = query_terms(text)
    except InvalidInput:
        return None
    if not terms:
        return None
    return RecallQuery(
        terms=tuple(terms),
        conversation_id=None if by_user else conversation_id,
        user_id=user_id if by_user else None,
        exclude_conversation=conversation_id,
        exclude_from_seq=turns[0].seq,
        allowance=reserve,
    )


def select(
    hits: Sequence[RecallHit],
    query: RecallQuery,
    *,
    first_seq: int | None,
    count_text: Callable[[str], int],
) -> tuple[list[RecallHit], str, int]:
    """The hits that go into the request, the text block that carries them, its raw tokens.

    Hits in the request already (this conversation, from ``first_seq`` on)
    are dropped; then those under the relevance threshold; then, best first,
    as many as fit in the allowance (a long turn is cut to fit, marked ``…``).
    """
    kept = [
        h
        for h in hits
        if not (
            h.conversation_id == query.exclude_conversation
            and first_seq is not None
            and h.seq >= first_seq
        )
    ]
    if not kept:
        return [], "", 0
    best = kept[0].score
    needed = max(
        min(MIN_SHARED_TERMS, len(query.terms)), math.ceil(len(query.terms) * MIN_COVERAGE)
    )
    kept = [
        h
        for h in kept
        if (best <= 0 or h.score >= best * RELATIVE_THRESHOLD)
        and shared_terms(query.terms, h.text) >= needed
    ]
    chosen: list[tuple[RecallHit, str]] = []
    left = query.allowance - count_text(RECALL_HEADER) - 2
    for hit in kept:
        line = hit_line(hit, query.exclude_conversation)
        tokens = count_text(line) + 1
        room = min(left, MAX_HIT_TOKENS)
        if tokens > room:
            if room < MIN_HIT_TOKENS:
                break
            line = _cut(line, room - 1, count_text)
            tokens = count_text(line) + 1
            if tokens > room:
                break
        chosen.append((hit, line))
        left -= tokens
    if not chosen:
        return [], "", 0
    # Laid out in the order they were said; ``recalled`` keeps relevance order.
    lines = [line for _, line in sorted(chosen, key=lambda c: (c[0].created_at, c[0].seq))]
    block = "\n\n".join([RECALL_HEADER, *lines])
    return [h for h, _ in chosen], block, count_text(block)


def hit_line(hit: RecallHit, conversation_id: str) -> str:
    where = f"turn {hit.seq}"
    if hit.conversation_id != conversation_id:
        where = f"conversation {hit.conversation_id}, turn {hit.seq}"
    return f"[{where}, {hit.role}, {hit.created_at:%Y-%m-%d}] {' '.join(hit.text.split())}"


def _cut(line: str, tokens: int, count_text: Callable[[str], int]) -> str:
    """``line`` cut (at a word) to at most ``tokens``, ending in ``…``."""
    size = len(line)
    while size > 0:
        size = int(size * min(0.9, tokens / max(1, count_text(line[:size] + "…"))))
        piece = line[:size].rsplit(" ", 1)[0] + "…"
        if count_text(piece) <= tokens:
            return piece
    return "…"


def attach(params: dict[str, Any], block: str) -> dict[str, Any]:
    """``params`` with ``block`` as a last text block of the newest user message.

    It comes after every cache breakpoint, so the cached prefix stays byte-identical.
    """
    messages = list(params["messages"])
    last = messages[-1]
    content: list[Block] = list(last["content"])
    content.append({"type": "text", "text": block})
    messages[-1] = {**last, "content": content}
    return {**params, "messages": messages}


def fill(
    window: ContextWindow,
    query: RecallQuery | None,
    hits: Sequence[RecallHit],
    *,
    reserved: int,
    count_text: Callable[[str], int],
    calibration: Calibration,
) -> ContextWindow:
    """``window`` (laid out with ``reserved`` raw tokens kept free) with the recalled turns.

    The reserve is given back and only what the recall block uses is counted.
    """
    chosen: list[RecallHit] = []
    block, tokens = "", 0
    if query is not None and hits and window.params.get("messages"):
        chosen, block, tokens = select(
            hits, query, first_seq=window.first_seq, count_text=count_text
        )
    raw = window.raw_tokens - reserved + tokens
    return replace(
        window,
        params=attach(window.params, block) if block else window.params,
        extra_tokens=window.extra_tokens - reserved,
        raw_tokens=raw,
        estimated_tokens=calibration.scale(raw, window.media_tokens),
        recalled=tuple(chosen),
        recall_tokens=tokens,
    )


#: Lookups a store remembers, and for how long (the other conversations of a
#: user may change meanwhile: a user-scope hit list is at most this old).
HIT_CACHE_SIZE: Final = 256
HIT_CACHE_SECONDS: Final = 60.0


class HitCache:
    """The hits of recent lookups, so a window built again for the same turn asks again for
    nothing (``window()`` then ``send()``, ``context()``, ``convo show --context``).

    The key is the lookup and the conversation's state (last turn, archive
    point, last change): any append, edit or compaction makes a new key. An
    entry lives ``HIT_CACHE_SECONDS``; the oldest go past ``HIT_CACHE_SIZE``.
    Safe across threads.
    """

    def __init__(
        self,
        size: int = HIT_CACHE_SIZE,
        seconds: float = HIT_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._size = size
        self._seconds = seconds
        self._clock = clock
        self._entries: OrderedDict[Any, tuple[float, list[RecallHit]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> list[RecallHit] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._clock() - entry[0] > self._seconds:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return list(entry[1])

    def put(self, key: Any, hits: Sequence[RecallHit]) -> None:
        with self._lock:
            self._entries[key] = (self._clock(), list(hits))
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
