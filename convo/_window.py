"""The context window: which turns go into the next request, and how it is laid out.

Plain functions over data; the store feeds them the live turns and writes
what they decide. A request is laid out for prompt caching::

    system:   [system prompt blocks..., summary of archived turns]  <- breakpoint 1
    messages: [live turns...]                                       <- breakpoints 2 and 3

The system part changes only when a compaction writes a new summary, and
the live turns only grow at the end between compactions, so consecutive
requests share a byte-identical prefix up to the previous turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ._budget import Calibration
from ._content import Block

#: Blocks that may carry ``cache_control`` (thinking blocks may not).
_CACHEABLE: Final = frozenset({"text", "image", "document", "tool_use", "tool_result"})
_THINKING: Final = frozenset({"thinking", "redacted_thinking"})
MAX_BREAKPOINTS: Final = 4
EPHEMERAL: Final = {"type": "ephemeral"}
#: Sent in place of a first turn when a stored conversation starts with the assistant.
OPENING_USER_TEXT: Final = "(conversation start)"
MISSING_TOOL_RESULT: Final = "(no result was recorded for this tool call)"
SUMMARY_HEADER: Final = (
    "Summary of the earlier part of this conversation (turns 1-{through} are archived "
    "and not shown below):\n\n"
)


@dataclass(frozen=True, slots=True)
class LiveTurn:
    """A stored turn as the context engine sees it."""

    seq: int
    role: str
    content: list[Block]
    tokens: int  # raw count of the turn, by the store's counter
    status: str = "complete"
    model: str | None = None


@dataclass(frozen=True, slots=True)
class SummaryPart:
    text: str
    through_seq: int
    tokens: int


@dataclass(frozen=True, slots=True)
class ContextWindow:
    """What the next request carries, and what it costs by our estimate."""

    params: dict[str, Any]
    budget: int
    estimated_tokens: int  # calibrated estimate of the whole input
    raw_tokens: int  # the same, by the store's counter before correction
    system_tokens: int
    summary_tokens: int
    message_tokens: int
    extra_tokens: int  # tools and other request fields
    summary_through_seq: int
    first_seq: int | None  # first stored turn in the request
    last_seq: int | None
    #: Live turns left out of this request because even after compaction they
    #: did not fit (compaction failed or was impossible). Still stored.
    omitted_seqs: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())


def system_blocks(system: str | list[Block] | None) -> list[Block]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"type": "text", "text": system}] if system.strip() else []
    return [dict(block) for block in system]


def summary_block(summary: SummaryPart) -> Block:
    header = SUMMARY_HEADER.format(through=summary.through_seq)
    return {"type": "text", "text": header + summary.text}


def count_breakpoints(value: Any) -> int:
    """``cache_control`` markers in a request part: on blocks, and on blocks nested in lists.

    Only lists are descended into (``content``, ``system``, ``tools``), not the
    objects a block carries (a tool's ``input``, a ``source``), which keeps this
    cheap on large tool inputs.
    """
    if isinstance(value, dict):
        return int("cache_control" in value) + sum(
            count_breakpoints(v) for v in value.values() if isinstance(v, list)
        )
    if isinstance(value, list):
        return sum(count_breakpoints(v) for v in value if isinstance(v, dict | list))
    return 0


# -- turning stored turns into a valid messages list -------------------------


def _visible_blocks(turn: LiveTurn, model: str) -> list[Block]:
    blocks = []
    for block in turn.content:
        kind = block.get("type")
        if kind in _THINKING and turn.model is not None and turn.model != model:
            continue  # tied to the model that wrote it: never replayed to another
        if kind == "text" and not str(block.get("text", "")).strip():
            continue  # e.g. the empty start of a reply cut off mid-stream
        blocks.append(block)
    return blocks


def _tool_use_ids(blocks: Sequence[Block]) -> list[str]:
    return [b["id"] for b in blocks if b.get("type") == "tool_use" and "id" in b]


def _tool_result_as_text(block: Block) -> Block:
    content = block.get("content")
    if isinstance(content, list):
        content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return {
        "type": "text",
        "text": f"[result of tool call {block.get('tool_use_id')}]: {content or ''}",
    }


def render_messages(turns: Sequence[LiveTurn], *, model: str) -> list[dict[str, Any]]:
    """The ``messages`` parameter for these turns, valid for the Messages API.

    * Consecutive turns of one role become one message (a user turn whose
      call failed is sent again together with the next one).
    * Thinking blocks of turns another model wrote are dropped; empty text
      blocks (a reply cut off before any text) are dropped; a turn left
      empty is skipped.
    * Every ``tool_use`` is answered by a ``tool_result`` first thing in the
      next user message (a missing one is filled in as an error result); a
      ``tool_result`` with no matching call becomes text.
    * The first message is a user message.
    Blocks are passed through otherwise untouched (unknown types included).
    """
    merged: list[tuple[str, list[Block]]] = []
    for turn in turns:
        blocks = _visible_blocks(turn, model)
        if not blocks:
            continue
        if merged and merged[-1][0] == turn.role:
            merged[-1][1].extend(blocks)
        else:
            merged.append((turn.role, list(blocks)))
    if merged and merged[0][0] == "assistant":
        merged.insert(0, ("user", [{"type": "text", "text": OPENING_USER_TEXT}]))

    messages: list[dict[str, Any]] = []
    pending_ids: list[str] = []
    for role, blocks in merged:
        if role == "user":
            answered = [b for b in blocks if b.get("type") == "tool_result"]
            rest = [b for b in blocks if b.get("type") != "tool_result"]
            results: list[Block] = []
            for tool_id in pending_ids:
                match = next((b for b in answered if b.get("tool_use_id") == tool_id), None)
                if match is None:
                    match = {
                        "type": "tool_result",
                        "tool_use_id": tool_id,
                        "content": MISSING_TOOL_RESULT,
                        "is_error": True,
                    }
                results.append(match)
            orphans = [
                _tool_result_as_text(b) for b in answered if b.get("tool_use_id") not in pending_ids
            ]
            blocks = results + orphans + rest
            pending_ids = []
        else:
            pending_ids = _tool_use_ids(blocks)
        messages.append({"role": role, "content": blocks})
    return messages


# -- where to cut -----------------------------------------------------------------


def safe_starts(turns: Sequence[LiveTurn]) -> list[int]:
    """Indexes where a live window may start: a user turn that answers no tool call.

    A ``tool_use`` and its ``tool_result`` are in consecutive turns, so a window
    that starts at such a turn never separates a pair.
    """
    return [
        index
        for index, turn in enumerate(turns)
        if turn.role == "user" and not any(b.get("type") == "tool_result" for b in turn.content)
    ]


def plan_compaction(
    turns: Sequence[LiveTurn], *, available: int, low_water: int, force: bool = False
) -> int:
    """How many of the oldest live turns to archive (0: none).

    Nothing happens while the turns fit in ``available`` (raw tokens, after the
    fixed parts) unless ``force``. Then the window is cut at a safe start so
    that what stays is at most ``low_water``: the fewest turns archived that
    achieve it, or, if even that is impossible, all but the last exchange.
    """
    total = sum(t.tokens for t in turns)
    if total <= available and not force:
        return 0
    starts = [i for i in safe_starts(turns) if i > 0]
    if not starts:
        return 0
    remaining = total
    archived = 0
    for index in starts:
        remaining -= sum(t.tokens for t in turns[archived:index])
        archived = index
        if remaining <= low_water and not force:
            return index
    return starts[-1]


def fit_to_budget(turns: Sequence[LiveTurn], *, available: int) -> int:
    """How many of the oldest turns to leave out of a request so the rest fits.

    The fallback when compaction could not run: turns stay stored but are not
    sent. Cuts only at safe starts; returns the last safe start if nothing fits.
    """
    total = sum(t.tokens for t in turns)
    if total <= available:
        return 0
    dropped = 0
    starts = [i for i in safe_starts(turns) if i > 0]
    for index in starts:
        total -= sum(t.tokens for t in turns[dropped:index])
        dropped = index
        if total <= available:
            return index
    return starts[-1] if starts else 0


# -- the request ------------------------------------------------------------------


def _mark(block: Block) -> Block:
    return {**block, "cache_control": dict(EPHEMERAL)}


def _mark_last_cacheable(message: dict[str, Any]) -> bool:
    """Mark the message's last cacheable block; False if there is none or it is marked."""
    blocks = message["content"]
    for index in range(len(blocks) - 1, -1, -1):
        if blocks[index].get("type") in _CACHEABLE:
            if "cache_control" in blocks[index]:
                return False
            message["content"] = [*blocks[:index], _mark(blocks[index]), *blocks[index + 1 :]]
            return True
    return False


def _strip_oldest_breakpoints(messages: list[dict[str, Any]], count: int) -> None:
    """Remove ``count`` caller-set markers from stored turns, oldest first."""
    for message in messages:
        blocks = message["content"]
        for index, block in enumerate(blocks):
            if count and "cache_control" in block:
                blocks[index] = {k: v for k, v in block.items() if k != "cache_control"}
                count -= 1


def place_breakpoints(system: list[Block], messages: list[dict[str, Any]], *, used: int) -> None:
    """Add convo's ``cache_control`` breakpoints, never more than 4 in all.

    In order of value: the newest user message (the growing conversation),
    the end of the system part (system prompt + summary), the previous user
    message (so a cache written one exchange ago is still found after a
    long tool loop). ``used`` counts the caller's own breakpoints in tools and
    system, which are kept; markers stored inside turns count too, and the
    oldest of those are dropped if there are more than 4 in all.
    """
    in_messages = count_breakpoints(messages)
    excess = used + in_messages - MAX_BREAKPOINTS
    if excess > 0:
        _strip_oldest_breakpoints(messages, min(excess, in_messages))
    free = MAX_BREAKPOINTS - used - count_breakpoints(messages)
    user_indexes = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if free > 0 and user_indexes and _mark_last_cacheable(messages[user_indexes[-1]]):
        free -= 1
    last_system = system[-1] if system else None
    if (
        free > 0
        and last_system is not None
        and last_system.get("type") in _CACHEABLE
        and "cache_control" not in last_system
    ):
        system[-1] = _mark(last_system)
        free -= 1
    if free > 0 and len(user_indexes) > 1 and _mark_last_cacheable(messages[user_indexes[-2]]):
        free -= 1


def assemble(
    *,
    model: str,
    system: str | list[Block] | None,
    summary: SummaryPart | None,
    turns: Sequence[LiveTurn],
    budget: int,
    calibration: Calibration,
    system_tokens: int,
    extra_tokens: int = 0,
    user_breakpoints: int = 0,
    notes: Sequence[str] = (),
) -> ContextWindow:
    """Lay out the request for ``turns`` within ``budget`` (calibrated tokens).

    ``system_tokens`` and ``extra_tokens`` are raw counts of the system prompt
    and of other request fields (tools). Turns that do not fit are left out,
    oldest first at safe starts, and listed in ``omitted_seqs``.
    """
    summary_tokens = summary.tokens if summary else 0
    fixed = system_tokens + summary_tokens + extra_tokens
    # Calibrated budget back to raw tokens: what the turns may use.
    available = int(budget / calibration.effective_factor) - fixed
    skip = fit_to_budget(turns, available=available)
    kept = list(turns[skip:])
    messages = render_messages(kept, model=model)
    system_part = system_blocks(system)
    if summary is not None:
        system_part.append(summary_block(summary))
    place_breakpoints(system_part, messages, used=user_breakpoints)
    params: dict[str, Any] = {"model": model, "messages": messages}
    if system_part:
        params["system"] = system_part
    message_tokens = sum(t.tokens for t in kept)
    raw = fixed + message_tokens
    return ContextWindow(
        params=params,
        budget=budget,
        estimated_tokens=calibration.scale(raw),
        raw_tokens=raw,
        system_tokens=system_tokens,
        summary_tokens=summary_tokens,
        message_tokens=message_tokens,
        extra_tokens=extra_tokens,
        summary_through_seq=summary.through_seq if summary else 0,
        first_seq=kept[0].seq if kept else None,
        last_seq=kept[-1].seq if kept else None,
        omitted_seqs=tuple(t.seq for t in turns[:skip]),
        notes=tuple(notes),
    )


def json_tokens_text(value: Any) -> str:
    """The text whose tokens stand for a JSON request field (tools, tool_choice)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
