"""Image and PDF bytes for tests: real headers, so sizes and page counts can be read."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png(width: int, height: int) -> bytes:
    """A valid grey PNG of this size."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def jpeg_header(width: int, height: int, *, exif_bytes: int = 0) -> bytes:
    """The start of a JPEG: SOI, an APP1 (EXIF) segment of ``exif_bytes``, then SOF0."""
    out = b"\xff\xd8"
    if exif_bytes:
        out += b"\xff\xe1" + struct.pack(">H", exif_bytes + 2) + b"E" * exif_bytes
    sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return out + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def gif_header(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00;"


def webp_header(width: int, height: int, kind: str) -> bytes:
    if kind == "VP8X":
        body = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
        body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif kind == "VP8L":
        bits = (width - 1) | ((height - 1) << 14)
        body = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits)
    else:
        body = b"VP8 " + struct.pack("<I", 10) + b"\x00" * 3 + b"\x9d\x01\x2a"
        body += struct.pack("<HH", width, height)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def pdf(pages: int, text: str = "Hello", *, compressed: bool = False) -> bytes:
    """A small PDF of ``pages`` pages, each showing ``text``; page objects in an object
    stream (zlib) if ``compressed``, as PDF 1.5+ writers do."""
    objects = [f"<< /Type /Page /Contents ({text}) Tj >>" for _ in range(pages)]
    if not compressed:
        body = "".join(f"{i + 3} 0 obj {o} endobj\n" for i, o in enumerate(objects))
        return f"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n{body}%%EOF".encode()
    stream = zlib.compress(" ".join(objects).encode())
    head = f"%PDF-1.5\n3 0 obj << /Type /ObjStm /N {pages} /Filter /FlateDecode >> stream\n"
    return head.encode() + stream + b"\nendstream endobj\n%%EOF"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_block(data: bytes, media_type: str = "image/png") -> dict[str, Any]:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": b64(data)},
    }


def pdf_block(data: bytes) -> dict[str, Any]:
    return {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": b64(data)},
    }
