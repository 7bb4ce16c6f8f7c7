"""Full-text search over every turn, archived ones included, with the database's own index.

SQLite uses an FTS5 table, PostgreSQL a GIN index over ``to_tsvector('simple', text)``,
MySQL/MariaDB a ``FULLTEXT`` index (all made by migration 0004). A query's
words must all match; results come newest first, each with a snippet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Integer, String, bindparam, text
from sqlalchemy.orm import Session

from ._content import Block
from ._models import UTCDateTime
from .errors import InvalidInput

SNIPPET_CHARS: Final = 70
_WORD: Final = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: str
    seq: int
    role: str
    created_at: datetime
    snippet: str


def searchable_text(blocks: Iterable[Block]) -> str:
    """The words of a turn worth finding: text, tool calls and their results."""
    parts: list[str] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            parts.append(
                f"{block.get('name', '')} {json.dumps(block.get('input', {}), ensure_ascii=False)}"
            )
        elif kind == "tool_result":
            content = block.get("content")
            if isinstance(content, list):
                parts.extend(str(b.get("text", "")) for b in content if isinstance(b, dict))
            elif isinstance(content, str):
                parts.append(content)
        elif kind == "document":
            source = block.get("source") or {}
            if source.get("type") == "text":
                parts.append(str(source.get("data", "")))
    # Derived text, not history: NULs (which PostgreSQL's text cannot hold) go.
    joined = "\n".join(p for p in parts if p.strip()).replace("\x00", " ")
    return joined if joined.strip() else ""


def query_words(query: str) -> list[str]:
    words = _WORD.findall(query)
    if not words:
        raise InvalidInput("query", "needs at least one word to search for")
    return words


def snippet(text_: str, words: list[str]) -> str:
    """The text around the first match, matches in [brackets]."""
    lowered = text_.lower()
    positions = [lowered.find(w.lower()) for w in words]
    found = [p for p in positions if p >= 0]
    start = max(0, min(found) - SNIPPET_CHARS // 2) if found else 0
    piece = " ".join(text_[start : start + SNIPPET_CHARS * 2].split())
    for word in sorted(set(words), key=len, reverse=True):
        piece = re.sub(f"(?i)(?<!\\[)\\b({re.escape(word)})", r"[\1]", piece)
    prefix = "…" if start > 0 else ""
    suffix = "…" if start + SNIPPET_CHARS * 2 < len(text_) else ""
    return prefix + piece + suffix


_SELECT: Final = """
SELECT s.conversation_id AS conversation_id, s.seq AS seq, m.role AS role,
       m.created_at AS created_at, {snippet} AS snippet
FROM {source}
JOIN convo_messages m ON m.conversation_id = s.conversation_id AND m.seq = s.seq
WHERE {match} {scope}
ORDER BY m.created_at DESC, s.id DESC
LIMIT :limit
"""


def search(
    session: Session, query: str, *, conversation_id: str | None = None, limit: int = 20
) -> list[SearchHit]:
    words = query_words(query)
    dialect = session.get_bind().dialect.name
    params: dict[str, Any] = {"limit": limit}
    scope = ""
    if conversation_id is not None:
        scope = "AND s.conversation_id = :conversation_id"
        params["conversation_id"] = conversation_id
    if dialect == "sqlite":
        params["q"] = " ".join('"' + w.replace('"', '""') + '"' for w in words)
        sql = _SELECT.format(
            snippet="snippet(convo_search_fts, 0, '[', ']', '…', 16)",
            source="convo_search_fts JOIN convo_search s ON s.id = convo_search_fts.rowid",
            match="convo_search_fts MATCH :q",
            scope=scope,
        )
    elif dialect == "postgresql":
        params["q"] = " ".join(words)
        sql = _SELECT.format(
            snippet="ts_headline('simple', s.text, plainto_tsquery('simple', :q), "
            "'StartSel=[, StopSel=], MaxWords=24, MinWords=8')",
            source="convo_search s",
            match="to_tsvector('simple', s.text) @@ plainto_tsquery('simple', :q)",
            scope=scope,
        )
    else:
        params["q"] = " ".join(f"+{w}" for w in words)
        sql = _SELECT.format(
            snippet="s.text",
            source="convo_search s",
            match="MATCH (s.text) AGAINST (:q IN BOOLEAN MODE)",
            scope=scope,
        )
    statement = (
        text(sql)
        .bindparams(bindparam("limit", type_=Integer))
        .columns(
            conversation_id=String, seq=Integer, role=String, created_at=UTCDateTime, snippet=String
        )
    )
    hits = []
    for row in session.execute(statement, params):
        shown = (
            row.snippet
            if dialect != "mysql" and dialect != "mariadb"
            else snippet(row.snippet, words)
        )
        hits.append(
            SearchHit(
                row.conversation_id, row.seq, row.role, row.created_at, " ".join(shown.split())
            )
        )
    return hits
