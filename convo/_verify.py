"""What ``convo verify`` checks: one conversation's stored rows against the rules they keep.

Plain functions over data: the store reads the rows (content as raw text, so
that an undecodable value is a finding rather than a crash) and hands them
here. Every fault is one line naming the conversation and what is wrong.

The rules:

* turns are numbered ``1..last_seq`` with no gap, and none past ``last_seq``;
* every role is ``user`` or ``assistant``;
* a live turn's content is a JSON list of content blocks (objects with a ``type``);
* an archived turn (content moved out) is held by exactly one archive block
  whose checksum holds and which files it under the same role;
* the turns up to ``archived_through_seq`` are archived and those after it are
  live, and a summary stands for them (a row ``through_seq == archived_through_seq``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from . import _archive
from .errors import ArchiveCorrupted

ROLES = frozenset({"user", "assistant"})
#: How many seqs one fault line names before it says "and N more".
SHOWN = 10


@dataclass(frozen=True, slots=True)
class StoredConversation:
    id: str
    last_seq: int
    archived_through_seq: int


@dataclass(frozen=True, slots=True)
class StoredTurn:
    seq: int
    role: str
    raw_content: str | None  # the stored JSON text; None once archived


@dataclass(frozen=True, slots=True)
class StoredBlock:
    first_seq: int
    last_seq: int
    payload: str
    checksum: str


def _seqs(seqs: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in seqs[:SHOWN])
    return shown + (f" and {len(seqs) - SHOWN} more" if len(seqs) > SHOWN else "")


def content_problem(raw: str) -> str | None:
    """Why a live turn's stored content is not a list of content blocks (None: it is)."""
    try:
        content = json.loads(raw)
    except ValueError as exc:
        return f"is not valid JSON ({exc})"
    if not isinstance(content, list):
        return f"is a JSON {type(content).__name__}, not a list of content blocks"
    if not content:
        return "has no content blocks"
    for index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return f"block {index} is not a content block (an object with a type)"
    return None


def check_conversation(
    conv: StoredConversation,
    turns: Sequence[StoredTurn],
    blocks: Sequence[StoredBlock],
    summary_through: Sequence[int],
) -> list[str]:
    """Every fault of one conversation (empty when all is well)."""
    faults: list[str] = []

    def fault(problem: str) -> None:
        faults.append(f"{conv.id}: {problem}")

    seqs = [t.seq for t in turns]
    expected = list(range(1, conv.last_seq + 1))
    if seqs != expected:
        present = set(seqs)
        missing = [s for s in expected if s not in present]
        beyond = [s for s in seqs if s > conv.last_seq]
        if missing:
            fault(
                f"turns are not numbered 1-{conv.last_seq} without gaps (missing {_seqs(missing)})"
            )
        if beyond:
            fault(
                f"its turn counter (last_seq {conv.last_seq}) is behind its turns "
                f"(found {_seqs(beyond)}); the next append would collide"
            )
    bad_roles = [t.seq for t in turns if t.role not in ROLES]
    if bad_roles:
        fault(f"turns {_seqs(bad_roles)} have a role other than user or assistant")

    # Archive blocks: each decodes, and files each turn under its stored role.
    archived_roles: dict[int, str] = {}
    for block in blocks:
        try:
            unpacked = _archive.unpack(
                conv.id, block.first_seq, block.last_seq, block.payload, block.checksum
            )
        except ArchiveCorrupted as exc:
            faults.append(str(exc))  # one fault per block, not one per turn it holds
            archived_roles.update(dict.fromkeys(range(block.first_seq, block.last_seq + 1), ""))
            continue
        for held in unpacked:
            if held.seq in archived_roles:
                fault(f"turn {held.seq} is held by more than one archive block")
            archived_roles[held.seq] = held.role

    uncovered, role_changed, bad_content = [], [], []
    live_before, archived_after = [], []
    for turn in turns:
        if turn.raw_content is None:
            if turn.seq not in archived_roles:
                uncovered.append(turn.seq)
            elif archived_roles[turn.seq] and archived_roles[turn.seq] != turn.role:
                role_changed.append(turn.seq)
            if turn.seq > conv.archived_through_seq:
                archived_after.append(turn.seq)
        else:
            problem = content_problem(turn.raw_content)
            if problem is not None:
                bad_content.append(f"turn {turn.seq}'s content {problem}")
            if turn.seq <= conv.archived_through_seq:
                live_before.append(turn.seq)
    if uncovered:
        fault(f"turns {_seqs(uncovered)} are archived but no archive block holds them")
    if role_changed:
        fault(f"turns {_seqs(role_changed)} have a role that differs from their archive block")
    faults.extend(f"{conv.id}: {problem}" for problem in bad_content)
    if archived_after:
        fault(
            f"turns {_seqs(archived_after)} are archived but come after archived_through_seq "
            f"({conv.archived_through_seq})"
        )
    if live_before:
        fault(
            f"turns {_seqs(live_before)} are live but archived_through_seq "
            f"({conv.archived_through_seq}) says they were archived"
        )
    if conv.archived_through_seq > conv.last_seq:
        fault(
            f"archived_through_seq ({conv.archived_through_seq}) is past its last turn "
            f"({conv.last_seq})"
        )
    archive_end = max((b.last_seq for b in blocks), default=0)
    if conv.archived_through_seq > archive_end:
        fault(
            f"archived_through_seq ({conv.archived_through_seq}) is past the archive, which "
            f"ends at turn {archive_end}"
        )
    if conv.archived_through_seq and conv.archived_through_seq not in summary_through:
        fault(
            f"no summary stands for the archived turns 1-{conv.archived_through_seq}: the "
            "summary row is missing"
        )
    return faults
