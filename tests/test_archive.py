"""Archive blocks: lossless, compressed, checksummed."""

from __future__ import annotations

import base64
import zlib

import pytest

from convo import ArchiveCorrupted
from convo._archive import ArchivedTurn, pack, unpack

TURNS = [
    ArchivedTurn(5, "user", [{"type": "text", "text": "Grüße, 世界! 🎉 " * 40}]),
    ArchivedTurn(6, "assistant", [{"type": "tool_use", "id": "t", "name": "f", "input": {"z": 1}}]),
    ArchivedTurn(7, "user", [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]),
]


def test_round_trip_is_exact() -> None:
    block = pack(TURNS)
    assert (block.first_seq, block.last_seq) == (5, 7)
    assert unpack("c", 5, 7, block.payload, block.checksum) == TURNS
    assert block.payload.isascii()


def test_realistic_text_compresses() -> None:
    block = pack(TURNS)
    assert len(block.payload) < block.raw_bytes / 2


def test_turns_must_be_consecutive() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        pack([TURNS[0], TURNS[2]])
    with pytest.raises(ValueError, match="at least one"):
        pack([])


def _tampered(payload: str) -> str:
    raw = zlib.decompress(base64.b64decode(payload)).replace(b"ok", b"OK")
    return base64.b64encode(zlib.compress(raw)).decode()


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda p: p[:-8], "cannot be decoded"),
        (lambda p: "!!" + p[2:], "cannot be decoded"),
        (_tampered, "checksum mismatch"),
    ],
)
def test_corruption_is_detected(mangle: object, problem: str) -> None:
    block = pack(TURNS)
    with pytest.raises(ArchiveCorrupted, match=problem) as caught:
        unpack("conv_x", 5, 7, mangle(block.payload), block.checksum)  # type: ignore[operator]
    assert (caught.value.first_seq, caught.value.last_seq) == (5, 7)


def test_a_block_filed_under_the_wrong_range_is_detected() -> None:
    block = pack(TURNS)
    with pytest.raises(ArchiveCorrupted, match="seq range"):
        unpack("conv_x", 4, 6, block.payload, block.checksum)
