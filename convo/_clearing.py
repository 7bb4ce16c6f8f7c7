"""Clearing old tool results from a request, so that long agent loops fit.

Modelled on Anthropic's context editing (``clear_tool_uses``): when the live
turns do not fit the budget, the content of old ``tool_result`` blocks is
replaced in the request by a short placeholder. The ``tool_use`` blocks stay
(the model still sees what it called, and can call again), and nothing
stored changes: ``history()`` stays exact, and a later compaction summarizes
the full results.

The policy, a plain function of the live turns:

* nothing is cleared while the turns fit;
* the results in the newest :data:`KEEP_TOOL_RESULT_TURNS` user turns that
  carry results are never cleared: the model is working with them;
* older ones are cleared oldest first, all the results of one turn at a
  time, until the turns fit;
* in steps of at least ``step`` tokens saved: the cleared turns are always
  the oldest ones, and their number only moves to the end of a step, whose
  bounds depend on the turns before them alone. So consecutive requests of a
  growing loop clear the same results, and share their cached prefix, until
  the next step, instead of clearing one more result (and rewriting the
  cache from there) on every turn.

If clearing all it may is not enough, the caller cuts the turns as before
(a compaction, or leaving the oldest out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from ._tokens import TokenCounter, count_turn

if TYPE_CHECKING:
    from ._window import LiveTurn

__all__ = ["CLEARED_TOOL_RESULT", "KEEP_TOOL_RESULT_TURNS", "clear_tool_results", "clearing_step"]

#: What a cleared ``tool_result`` says instead of its content.
CLEARED_TOOL_RESULT: Final = "(tool result cleared to save context)"
#: The newest user turns with tool results whose results are never cleared.
KEEP_TOOL_RESULT_TURNS: Final = 3
#: Clearing saves at least this share of the budget at a time (see the module docstring).
CLEARING_STEP_SHARE: Final = 0.1


def clearing_step(budget: int) -> int:
    """Tokens one step of clearing saves at least, for a request budget."""
    return int(budget * CLEARING_STEP_SHARE)


def _cleared_block(block: dict[str, Any]) -> dict[str, Any]:
    cleared = {
        "type": "tool_result",
        "tool_use_id": block.get("tool_use_id"),
        "content": CLEARED_TOOL_RESULT,
    }
    for key in ("is_error", "cache_control"):
        if key in block:
            cleared[key] = block[key]
    return cleared


def _has_results(turn: LiveTurn) -> bool:
    return turn.role == "user" and any(b.get("type") == "tool_result" for b in turn.content)


def cleared_turn(turn: LiveTurn, counter: TokenCounter) -> LiveTurn:
    """``turn`` with the content of its tool results replaced, counted exactly by ``counter``."""
    content = [
        _cleared_block(block) if block.get("type") == "tool_result" else block
        for block in turn.content
    ]
    return replace(turn, content=content, tokens=count_turn(counter, content))


def clear_tool_results(
    turns: Sequence[LiveTurn],
    *,
    available: int,
    counter: TokenCounter,
    keep: int = KEEP_TOOL_RESULT_TURNS,
    step: int = 0,
) -> list[LiveTurn]:
    """The turns with old tool results cleared until they fit ``available`` raw tokens.

    Returns a new list; turns that are not cleared are the same objects. Only
    the turns that may be cleared are counted again (their results become a
    placeholder; pass a caching counter), never the others.
    """
    out = list(turns)
    total = sum(turn.tokens for turn in out)
    if total <= available:
        return out
    holders = [index for index, turn in enumerate(out) if _has_results(turn)]
    clearable: list[tuple[int, LiveTurn, int]] = []
    for index in holders[: max(len(holders) - keep, 0)]:
        cleared = cleared_turn(out[index], counter)
        saving = out[index].tokens - cleared.tokens
        if saving > 0:
            clearable.append((index, cleared, saving))
    count = saved = 0
    while count < len(clearable) and total - saved > available:
        saved += clearable[count][2]
        count += 1
    if step > 0:
        # Round up to the end of the step it falls in (if that step is complete).
        done = in_step = 0
        for number, (_, _, saving) in enumerate(clearable, 1):
            in_step += saving
            if in_step >= step:
                done, in_step = number, 0
                if done >= count:
                    count = done
                    break
    for index, cleared, _ in clearable[:count]:
        out[index] = cleared
    return out
