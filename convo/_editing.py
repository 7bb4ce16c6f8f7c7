"""Editing a stored history: which turns an edit, a deletion or a regeneration touches.

Pure decisions over live turns; the store only runs the SQL. The rules keep
the history a valid Messages API conversation:

* only live turns (after ``archived_through_seq``) change: archived turns sit
  in checksummed blocks and the rolling summary was written from them;
* a ``tool_use`` turn and the ``tool_result`` turn answering it are deleted
  together, and an edit keeps a turn's tool ids as they were;
* regenerating takes back the trailing assistant turn(s) and the user turn
  they answer, which is then sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ._content import Block
from ._window import LiveTurn
from .errors import InvalidInput

__all__ = ["check_edit", "deletion_span", "regeneration_span"]

_ARCHIVED: Final = (
    "is archived (compressed into a checksummed block and summarized); only live turns, "
    "after {archived}, can be changed"
)


def _tool_ids(blocks: Sequence[Block], kind: str, key: str) -> set[str]:
    return {str(b.get(key)) for b in blocks if b.get("type") == kind}


def _calls(blocks: Sequence[Block]) -> set[str]:
    return _tool_ids(blocks, "tool_use", "id")


def _answers(blocks: Sequence[Block]) -> set[str]:
    return _tool_ids(blocks, "tool_result", "tool_use_id")


def _live_turn(turns: Sequence[LiveTurn], seq: int, archived_through_seq: int) -> int:
    """The index of turn ``seq`` among the live ``turns``; a clear error otherwise."""
    if seq <= archived_through_seq:
        raise InvalidInput("seq", f"turn {seq} " + _ARCHIVED.format(archived=archived_through_seq))
    for index, turn in enumerate(turns):
        if turn.seq == seq:
            return index
    last = turns[-1].seq if turns else archived_through_seq
    raise InvalidInput("seq", f"there is no turn {seq} (the conversation has {last})")


def check_edit(
    turns: Sequence[LiveTurn], seq: int, archived_through_seq: int, new: Sequence[Block]
) -> LiveTurn:
    """The live turn ``seq``, if replacing its content with ``new`` keeps the history valid."""
    old = turns[_live_turn(turns, seq, archived_through_seq)]
    for name, ids in (("tool_use", _calls), ("tool_result", _answers)):
        if ids(old.content) != ids(new):
            before = ", ".join(sorted(ids(old.content))) or "none"
            after = ", ".join(sorted(ids(new))) or "none"
            raise InvalidInput(
                "content",
                f"turn {seq} must keep its {name} ids ({before} -> {after}); "
                "delete the tool pair instead",
            )
    return old


def deletion_span(turns: Sequence[LiveTurn], seq: int, archived_through_seq: int) -> range:
    """The seqs deleting turn ``seq`` removes: it, and its tool partner if it has one."""
    index = _live_turn(turns, seq, archived_through_seq)
    first = last = index
    turn = turns[index]
    if _answers(turn.content):
        if index == 0:
            raise InvalidInput(
                "seq",
                f"turn {seq} answers a tool call in an archived turn; it cannot be deleted alone",
            )
        first = index - 1
    if _calls(turn.content) and index + 1 < len(turns):
        following = turns[index + 1]
        if _answers(following.content) & _calls(turn.content):
            last = index + 1
    return range(turns[first].seq, turns[last].seq + 1)


def regeneration_span(turns: Sequence[LiveTurn], archived_through_seq: int) -> range:
    """The seqs regenerating takes back: the last user turn and the replies after it."""
    if not turns or turns[-1].role != "assistant":
        raise InvalidInput("conversation", "has no reply to regenerate: its last turn is not one")
    index = len(turns) - 1
    while index >= 0 and turns[index].role == "assistant":
        index -= 1
    if index < 0:
        raise InvalidInput(
            "conversation",
            "the turn the last reply answers " + _ARCHIVED.format(archived=archived_through_seq),
        )
    return range(turns[index].seq, turns[-1].seq + 1)
