"""Files as content blocks: images, PDFs and text files.

``file_block(path)`` reads a file and returns the Messages API block for it:
an ``image`` block (JPEG, PNG, GIF, WebP; base64), a ``document`` block with
a base64 PDF source, or a ``document`` block with a plain-text source (any
UTF-8 text file). Documents are titled with the file's name. A PDF is
estimated from its page count, as every PDF block is (``_tokens``).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Final

from ._content import Block
from .errors import InvalidInput

__all__ = ["MAX_IMAGE_BYTES", "MAX_PDF_BYTES", "file_block"]

#: The API's limit for one image.
MAX_IMAGE_BYTES: Final = 5 * 1024 * 1024
#: The API's limit for a whole request, and so for one PDF in it.
MAX_PDF_BYTES: Final = 32 * 1024 * 1024

_IMAGE_SIGNATURES: Final = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def _image_type(data: bytes) -> str | None:
    for signature, media_type in _IMAGE_SIGNATURES:
        if data.startswith(signature):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def file_block(path: str | Path) -> Block:
    """The content block for the file at ``path`` (its type is read from its bytes)."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InvalidInput("file", f"cannot read {file}: {exc.strerror or exc}") from None
    media_type = _image_type(data)
    if media_type is not None:
        if len(data) > MAX_IMAGE_BYTES:
            raise InvalidInput(
                "file", f"{file} is {len(data):,} bytes; an image may have at most 5 MB"
            )
        encoded = base64.b64encode(data).decode("ascii")
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": encoded},
        }
    if data.startswith(b"%PDF-"):
        if len(data) > MAX_PDF_BYTES:
            raise InvalidInput(
                "file", f"{file} is {len(data):,} bytes; a PDF may have at most 32 MB"
            )
        return {
            "type": "document",
            "source": {
                "type": "base64",
                "media_type": "application/pdf",
                "data": base64.b64encode(data).decode("ascii"),
            },
            "title": file.name,
        }
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(
            "file", f"{file} is neither an image (JPEG, PNG, GIF, WebP), a PDF nor UTF-8 text"
        ) from None
    if not text.strip():
        raise InvalidInput("file", f"{file} is empty")
    return {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": text},
        "title": file.name,
    }
