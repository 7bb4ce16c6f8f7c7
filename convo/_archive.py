"""Archive blocks: old turns, losslessly packed.

A block is the JSON of whole turns (``[{"seq", "role", "content"}, ...]``),
zlib-compressed and base64-encoded, with the SHA-256 of the JSON as its
checksum. Decoding checks the checksum and that the turns are exactly the
ones the block claims to hold; anything else raises
:class:`~convo.errors.ArchiveCorrupted` rather than losing a turn silently.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .errors import ArchiveCorrupted

FORMAT_VERSION: Final = 1
COMPRESSION_LEVEL: Final = 9


@dataclass(frozen=True, slots=True)
class ArchivedTurn:
    seq: int
    role: str
    content: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class PackedBlock:
    first_seq: int
    last_seq: int
    payload: str  # base64(zlib(json))
    checksum: str  # sha256 hex of the json
    raw_bytes: int  # size of the json


def encode(turns: Sequence[ArchivedTurn]) -> bytes:
    document = [{"seq": t.seq, "role": t.role, "content": t.content} for t in turns]
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def pack(turns: Sequence[ArchivedTurn]) -> PackedBlock:
    """Pack consecutive turns into one block."""
    if not turns:
        raise ValueError("an archive block holds at least one turn")
    seqs = [t.seq for t in turns]
    if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
        raise ValueError(f"archive block turns must be consecutive, got {seqs}")
    raw = encode(turns)
    return PackedBlock(
        first_seq=seqs[0],
        last_seq=seqs[-1],
        payload=base64.b64encode(zlib.compress(raw, COMPRESSION_LEVEL)).decode("ascii"),
        checksum=hashlib.sha256(raw).hexdigest(),
        raw_bytes=len(raw),
    )


def pack_bounded(
    turns: Sequence[ArchivedTurn], *, max_turns: int, max_bytes: int
) -> list[PackedBlock]:
    """Pack consecutive turns into blocks of at most ``max_turns`` turns and
    ``max_bytes`` bytes of JSON each (a bigger single turn is a block alone)."""
    blocks: list[PackedBlock] = []
    group: list[ArchivedTurn] = []
    size = 0
    for turn in turns:
        turn_bytes = len(encode([turn]))
        if group and (len(group) >= max_turns or size + turn_bytes > max_bytes):
            blocks.append(pack(group))
            group, size = [], 0
        group.append(turn)
        size += turn_bytes
    if group:
        blocks.append(pack(group))
    return blocks


def unpack(
    conversation_id: str, first_seq: int, last_seq: int, payload: str, checksum: str
) -> list[ArchivedTurn]:
    """The turns of a block, checked; :class:`ArchiveCorrupted` if anything is off."""

    def corrupted(problem: str) -> ArchiveCorrupted:
        return ArchiveCorrupted(conversation_id, first_seq, last_seq, problem)

    try:
        raw = zlib.decompress(base64.b64decode(payload.encode("ascii"), validate=True))
    except (binascii.Error, zlib.error, UnicodeEncodeError, ValueError) as exc:
        raise corrupted(f"cannot be decoded ({exc})") from None
    if hashlib.sha256(raw).hexdigest() != checksum:
        raise corrupted("checksum mismatch")
    try:
        document = json.loads(raw)
        turns = [ArchivedTurn(d["seq"], d["role"], d["content"]) for d in document]
    except (ValueError, KeyError, TypeError) as exc:
        raise corrupted(f"unexpected contents ({exc})") from None
    if [t.seq for t in turns] != list(range(first_seq, last_seq + 1)):
        raise corrupted("its turns do not match the seq range it is filed under")
    return turns
