"""Full-text search and ranked recall over every turn, archived ones included.

Both use the database's own full-text index over ``convo_search``:

* ``search``: every term must match, exactly (no stemming): words, word
  prefixes (``refund*``) and ``"quoted phrases"``; newest first, filtered by
  role and date if asked.
  SQLite: an FTS5 table (``unicode61``); PostgreSQL: a GIN index over
  ``to_tsvector('simple', text)``; MySQL/MariaDB: ``FULLTEXT`` in boolean
  mode (made by migration 0004).
* ``recall``: any word may match, stems too, best first by the engine's own
  relevance. SQLite: ``bm25()`` over an FTS5 table with the ``porter``
  tokenizer; PostgreSQL: ``ts_rank_cd`` over a stored generated column
  ``to_tsvector('english', text)`` with a GIN index (migration 0005);
  MySQL/MariaDB: natural-language mode over the same ``FULLTEXT`` index,
  which has no stemmer, so each word is also looked up by a crude stem
  (``trams`` -> ``tram``), and which ignores its own stop words and words
  shorter than ``innodb_ft_min_token_size`` (3 by default).

Query text is only ever a bound parameter, and each word is quoted for the
engine's query syntax (FTS5 strings, tsquery lexemes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Float, Integer, String, TextualSelect, bindparam, text
from sqlalchemy.orm import Session

from ._content import Block
from ._models import UTCDateTime
from ._recall import MAX_CANDIDATES, RecallHit, rarest_terms, with_variants
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


@dataclass(frozen=True, slots=True)
class Term:
    """One part of a query: a word, a word prefix (``refund*``) or a ``"quoted phrase"``."""

    words: tuple[str, ...]
    prefix: bool = False


_TERM: Final = re.compile(r'"([^"]*)"?|(\w+)(\*)?', re.UNICODE)


def parse_query(query: str) -> list[Term]:
    """The terms of a query; every one must match. Punctuation outside words is ignored."""
    terms: list[Term] = []
    for match in _TERM.finditer(query):
        if match.group(2) is not None:
            terms.append(Term((match.group(2),), prefix=match.group(3) is not None))
        elif words := _WORD.findall(match.group(1) or ""):
            terms.append(Term(tuple(words)))
    if not terms:
        raise InvalidInput("query", "needs at least one word to search for")
    return terms


def _sqlite_match(terms: list[Term]) -> str:
    return " ".join('"' + " ".join(t.words) + '"' + ("*" if t.prefix else "") for t in terms)


def _postgres_match(terms: list[Term]) -> str:
    return " & ".join(
        " <-> ".join(f"'{w}'" for w in t.words) + (":*" if t.prefix else "") for t in terms
    )


def _mysql_match(terms: list[Term]) -> str:
    return " ".join(
        f'+"{" ".join(t.words)}"' if len(t.words) > 1 else f"+{t.words[0]}" + "*" * t.prefix
        for t in terms
    )


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
       m.created_at AS created_at, {snippet} AS snippet, {extra}
FROM {source}
JOIN convo_messages m ON m.conversation_id = s.conversation_id AND m.seq = s.seq {join}
WHERE {match} {scope}
ORDER BY {order}
LIMIT :limit
"""
_NEWEST: Final = "m.created_at DESC, s.id DESC"
_COLUMNS_NO_SNIPPET: Final = {
    "conversation_id": String,
    "seq": Integer,
    "role": String,
    "created_at": UTCDateTime,
}
_COLUMNS: Final = {**_COLUMNS_NO_SNIPPET, "snippet": String}


def _statement(sql: str, **columns: Any) -> TextualSelect:
    return text(sql).bindparams(bindparam("limit", type_=Integer)).columns(**_COLUMNS, **columns)


def _shown(dialect: str, snippet_: str, words: list[str]) -> str:
    shown = snippet(snippet_, words) if dialect in ("mysql", "mariadb") else snippet_
    return " ".join(shown.split())


def search(
    session: Session,
    query: str,
    *,
    conversation_id: str | None = None,
    limit: int = 20,
    role: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[SearchHit]:
    """Turns matching every term of ``query`` (see :func:`parse_query`), newest first.

    ``role`` keeps one role's turns; ``since``/``until`` bound when they were written.
    """
    terms = parse_query(query)
    words = [w for t in terms for w in t.words]
    dialect = session.get_bind().dialect.name
    params: dict[str, Any] = {"limit": limit}
    scopes = []
    if conversation_id is not None:
        scopes.append("AND s.conversation_id = :conversation_id")
        params["conversation_id"] = conversation_id
    if role is not None:
        if role not in ("user", "assistant"):
            raise InvalidInput("role", f"must be 'user' or 'assistant', not {role!r}")
        scopes.append("AND m.role = :role")
        params["role"] = role
    if since is not None:
        scopes.append("AND m.created_at >= :since")
        params["since"] = since
    if until is not None:
        scopes.append("AND m.created_at < :until")
        params["until"] = until
    parts = {"scope": " ".join(scopes), "join": "", "order": _NEWEST, "extra": "s.id AS id"}
    if dialect == "sqlite":
        params["q"] = _sqlite_match(terms)
        sql = _SELECT.format(
            snippet="snippet(convo_search_fts, 0, '[', ']', '…', 16)",
            source="convo_search_fts JOIN convo_search s ON s.id = convo_search_fts.rowid",
            match="convo_search_fts MATCH :q",
            **parts,
        )
    elif dialect == "postgresql":
        params["q"] = _postgres_match(terms)
        sql = _SELECT.format(
            snippet="ts_headline('simple', s.text, to_tsquery('simple', :q), "
            "'StartSel=[, StopSel=], MaxWords=24, MinWords=8')",
            source="convo_search s",
            match="to_tsvector('simple', s.text) @@ to_tsquery('simple', :q)",
            **parts,
        )
    else:
        params["q"] = _mysql_match(terms)
        sql = _SELECT.format(
            snippet="s.text",
            source="convo_search s",
            match="MATCH (s.text) AGAINST (:q IN BOOLEAN MODE)",
            **parts,
        )
    dates = [bindparam(n, type_=UTCDateTime) for n in ("since", "until") if n in params]
    return [
        SearchHit(
            row.conversation_id,
            row.seq,
            row.role,
            row.created_at,
            _shown(dialect, row.snippet, words),
        )
        for row in session.execute(_statement(sql, id=Integer).bindparams(*dates), params)
    ]


def _fts5_string(word: str) -> str:
    """``word`` as an FTS5 string: whatever it holds, never query syntax."""
    return '"' + word.replace('"', '""') + '"'


def recall(
    session: Session,
    terms: Sequence[str],
    *,
    conversation_id: str | None = None,
    user_id: str | None = None,
    exclude: tuple[str, int] | None = None,
    k: int = 10,
) -> list[RecallHit]:
    """The ``k`` turns most relevant to any of ``terms``, best first (see ``_recall``)."""
    if not terms:
        return []
    dialect = session.get_bind().dialect.name
    params: dict[str, Any] = {"limit": k}
    scope = []
    join = ""
    if conversation_id is not None:
        scope.append("AND s.conversation_id = :conversation_id")
        params["conversation_id"] = conversation_id
    if user_id is not None:
        join = "JOIN convo_conversations c ON c.id = s.conversation_id"
        scope.append("AND c.user_id = :user_id")
        params["user_id"] = user_id
    if exclude is not None:
        scope.append("AND NOT (s.conversation_id = :ex_conversation AND s.seq >= :ex_seq)")
        params["ex_conversation"], params["ex_seq"] = exclude
    if dialect != "postgresql":
        # PostgreSQL ranks a stored tsvector per match cheaply, but counting a word's
        # matches there is a scan of its own: only the others leave common words out.
        terms = rarest_terms(terms, [_matches(session, dialect, t) for t in terms])
    if not terms:
        return []
    if dialect == "sqlite":
        params["q"] = " OR ".join(_fts5_string(t) for t in terms)
        score = "-bm25(convo_search_fts_stem)"
        source = "convo_search_fts_stem JOIN convo_search s ON s.id = convo_search_fts_stem.rowid"
        match = "convo_search_fts_stem MATCH :q"
    elif dialect == "postgresql":
        # Words are \w+ only, quoted: never tsquery syntax. 'english' stems them.
        params["q"] = " | ".join(f"'{t}'" for t in terms)
        score = "ts_rank_cd(s.convo_search_fts_english, to_tsquery('english', :q), 1)"
        source = "convo_search s"
        match = "s.convo_search_fts_english @@ to_tsquery('english', :q)"
    else:
        params["q"] = " ".join(with_variants(terms))
        score = "MATCH (s.text) AGAINST (:q IN NATURAL LANGUAGE MODE)"
        source = "convo_search s"
        match = score
    # Rank on the index alone, then read the k winners' rows: the cost of a lookup
    # is the ranking of the matches, not k rows of text, role and date per match.
    sql = _RECALL.format(score=score, source=source, join=join, match=match, scope=" ".join(scope))
    statement = (
        text(sql)
        .bindparams(bindparam("limit", type_=Integer))
        .columns(**_COLUMNS_NO_SNIPPET, score=Float, text=String)
    )
    shown = with_variants(terms)
    return [
        RecallHit(
            row.conversation_id,
            row.seq,
            row.role,
            row.created_at,
            float(row.score),
            " ".join(snippet(row.text, shown).split()),
            row.text,
        )
        for row in session.execute(statement, params)
    ]


def _matches(session: Session, dialect: str, term: str) -> int:
    """How many turns ``term`` matches in the whole index, counted up to MAX_CANDIDATES + 1."""
    if dialect == "sqlite":
        match, q = "convo_search_fts_stem MATCH :q", _fts5_string(term)
        source = "convo_search_fts_stem"
    elif dialect == "postgresql":
        match, q = "convo_search_fts_english @@ to_tsquery('english', :q)", f"'{term}'"
        source = "convo_search"
    else:
        match, q = (
            "MATCH (text) AGAINST (:q IN NATURAL LANGUAGE MODE)",
            " ".join(with_variants([term])),
        )
        source = "convo_search"
    sql = f"SELECT count(*) FROM (SELECT 1 AS one FROM {source} WHERE {match} LIMIT :cap) x"
    statement = text(sql).bindparams(bindparam("cap", type_=Integer))
    return int(session.execute(statement, {"q": q, "cap": MAX_CANDIDATES + 1}).scalar_one())


_RECALL: Final = """
SELECT s.conversation_id AS conversation_id, s.seq AS seq, m.role AS role,
       m.created_at AS created_at, r.score AS score, s.text AS text
FROM (
    SELECT s.id AS id, {score} AS score
    FROM {source} {join}
    WHERE {match} {scope}
    ORDER BY score DESC, s.id DESC
    LIMIT :limit
) r
JOIN convo_search s ON s.id = r.id
JOIN convo_messages m ON m.conversation_id = s.conversation_id AND m.seq = s.seq
ORDER BY r.score DESC, s.id DESC
"""
