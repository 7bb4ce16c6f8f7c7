"""Redaction of personal data and secrets from text and content blocks.

Each finding is replaced by ``[REDACTED:<kind>]``. The built-in kinds:

``card``
    Payment card numbers: 13-19 digits, optionally grouped by spaces or dashes,
    with a card network's leading digit (2-6) and a valid Luhn check digit, so
    most random numbers (order numbers, timestamps) are kept.
``ssn``
    US social security numbers, ``ddd-dd-dddd``, without the never-issued
    areas 000, 666 and 9xx, group 00 or serial 0000.
``email``
    Email addresses with a domain and an alphabetic top-level domain.
``phone``
    E.164 numbers (``+14155552671``, also grouped: ``+44 20 7946 0958``) and
    US numbers with a valid area code: ``(415) 555-2671``, ``415-555-2671``,
    ``415.555.2671``, ``+1 415 555 2671``. A bare run of digits is not a phone.
``api_key``
    Anthropic (``sk-ant-...``) and OpenAI-style (``sk-...``) keys, AWS access
    key ids (``AKIA...``), GitHub tokens (``ghp_...``, ``github_pat_...``), and
    the value of assignments such as ``api_key=...``, ``token: ...``,
    ``"password": "..."`` when the value looks like a secret (8 or more
    characters with a digit, or 16 or more).
``bearer``
    The credentials after ``Bearer`` and in ``Authorization:`` headers.

Where findings overlap, they are merged into one redaction (nothing of either
is left), named after the kind listed first: extra patterns, then ``bearer``,
``api_key``, ``email``, ``card``, ``ssn``, ``phone``. Text touching a marker
is never a finding (before, it touched the finding's own characters), so
redacting redacted text changes nothing, with the built-in kinds.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, overload

from convo.errors import InvalidInput

__all__ = ["DEFAULT_KINDS", "KINDS", "Redactor"]

#: Every built-in kind, in the order that names a merged redaction.
KINDS: Final = ("bearer", "api_key", "email", "card", "ssn", "phone")
#: The kinds a :class:`Redactor` looks for unless told otherwise: all of them.
DEFAULT_KINDS: Final = KINDS

_EXTRA_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_MARKER: Final = re.compile(r"\[REDACTED:[A-Za-z][A-Za-z0-9_-]*\]")


def _marker(kind: str) -> str:
    """What a finding of ``kind`` is replaced with."""
    return f"[REDACTED:{kind}]"


# --- detectors -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _MarkerEdges:
    """Where the markers already in a text start and end."""

    starts: frozenset[int]
    ends: frozenset[int]

    @classmethod
    def of(cls, text: str) -> _MarkerEdges | None:
        if "[REDACTED:" not in text:
            return None
        spans = [found.span() for found in _MARKER.finditer(text)]
        return cls(frozenset(start for start, _ in spans), frozenset(end for _, end in spans))


@dataclass(frozen=True, slots=True)
class _Detector:
    """One regular expression for a kind, and which part of each match to redact.

    ``group`` names the part to redact (the whole match if None); ``accept``
    vets each match (every match is a finding if None).
    """

    pattern: re.Pattern[str]
    group: str | None = None
    accept: Callable[[re.Match[str]], bool] | None = None

    def spans(self, text: str, markers: _MarkerEdges | None) -> Iterator[tuple[int, int]]:
        """The spans to redact, except matches touching a marker.

        A match right next to a marker was, before that redaction, right next
        to the finding's own characters, which made it part of a longer word
        or number then: it is not a finding now either. This is what makes
        redaction idempotent.
        """
        for match in self.pattern.finditer(text):
            if markers is not None and (
                match.start() in markers.ends or match.end() in markers.starts
            ):
                continue
            if self.accept is not None and not self.accept(match):
                continue
            start, end = match.span(self.group) if self.group else match.span()
            if start < end:
                yield start, end


#: Between the digit groups of a card number: a space (also no-break and thin
#: spaces), a dash or a dot.
_CARD_SEPARATOR: Final = "[ .\u00a0\u2007\u2009\u202f-]"


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _is_card(match: re.Match[str]) -> bool:
    # Full-width and other Unicode digits count as the digits they are.
    candidate = unicodedata.normalize("NFKC", match.group())
    digits = re.sub(r"\D", "", candidate)
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
        return False
    separators = set(re.findall(r"\D", candidate))
    if separators:
        # Grouped as cards print: one kind of separator, 4 digits first, no tiny groups.
        groups = re.split(r"\D", candidate)
        if len(separators) > 1 or len(groups[0]) != 4 or min(map(len, groups)) < 3:
            return False
    return _luhn_valid(digits)


def _looks_secret(value: str) -> bool:
    """A credential, not a word: 8+ characters with a digit, or simply long."""
    return len(value) >= 16 or (len(value) >= 8 and any(c.isdigit() for c in value))


def _secret_looks_secret(match: re.Match[str]) -> bool:
    return _looks_secret(match.group("secret"))


def _has_digit(match: re.Match[str]) -> bool:
    return any(c.isdigit() for c in match.group())


def _is_e164(match: re.Match[str]) -> bool:
    return 8 <= sum(c.isdigit() for c in match.group()) <= 15


def _authorization_is_credential(match: re.Match[str]) -> bool:
    # After a scheme ("Bearer ...") the value is a credential whatever it looks like.
    return match.group("scheme") is not None or _looks_secret(match.group("secret"))


# Values of assignments and headers stop at whitespace, quotes and brackets.
_VALUE: Final = r"(?!\[REDACTED:)(?P<secret>[^\s\"'`,;&()\[\]{}<>]+)"
_SECRET_NAMES: Final = (
    r"api[_-]?key|apikey|access[_-]?key(?:[_-]?id)?|secret[_-]?access[_-]?key|secret[_-]?key"
    r"|private[_-]?key|client[_-]?secret|secret|access[_-]?token|refresh[_-]?token"
    r"|auth[_-]?token|token|password|passwd|pwd|key"
)

#: JSON keys whose value is a credential whatever it looks like. Narrower than the
#: names above: a bare "key" or "token" in a tool's input is usually not a secret.
_CREDENTIAL_KEY: Final = re.compile(
    r"(?i)(?:x[_-])?(?:api[_-]?key|apikey|access[_-]?key(?:[_-]?id)?|secret[_-]?access[_-]?key"
    r"|secret[_-]?key|private[_-]?key|client[_-]?secret|secret|access[_-]?token"
    r"|refresh[_-]?token|auth[_-]?token|bearer[_-]?token|password|passwd|pwd|passphrase"
    r"|authorization)"
)

_BUILTIN_DETECTORS: Final[Mapping[str, tuple[_Detector, ...]]] = {
    "card": (
        _Detector(
            re.compile(rf"(?<![\w.,+-])\d(?:{_CARD_SEPARATOR}?\d){{12,18}}(?![\w-]|[.,][\d\[])"),
            accept=_is_card,
        ),
    ),
    "ssn": (
        _Detector(
            re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])")
        ),
    ),
    "email": (
        _Detector(
            re.compile(
                r"(?<![\w.%+-])[\w.%+-]+@"
                r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+(?:[^\W\d_]{2,24}|xn--[a-z0-9-]{1,59})"
                r"(?![\w-]|\.[^\W_\[])"
            )
        ),
    ),
    "phone": (
        # E.164, possibly grouped by single spaces or dashes.
        _Detector(
            re.compile(r"(?<!\+)\+[1-9](?:[ -]?\d){6,14}(?!\w|[ -][\d\[])"),
            accept=_is_e164,
        ),
        # US: (415) 555-2671, 415-555-2671, 415.555.2671, 415 555 2671, with +1 or 1.
        _Detector(
            re.compile(
                r"(?<![\w+.-])(?:\+?1[ .-]?)?"
                r"(?:\([2-9]\d{2}\)[ ]?[2-9]\d{2}[ .-]|[2-9]\d{2}(?P<sep>[ .-])[2-9]\d{2}(?P=sep))"
                r"\d{4}(?![\w-]|\.[\d\[])"
            )
        ),
    ),
    "api_key": (
        _Detector(re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{20,}"), accept=_has_digit),
        _Detector(re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
        _Detector(re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b")),
        _Detector(re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b")),
        _Detector(
            re.compile(
                rf"(?i)(?<![A-Za-z0-9])(?:{_SECRET_NAMES})[\"']?[ \t]*[:=][ \t]*[\"']?{_VALUE}"
            ),
            group="secret",
            accept=_secret_looks_secret,
        ),
    ),
    "bearer": (
        _Detector(
            re.compile(
                r"(?i)(?<![A-Za-z0-9])(?:proxy-)?authorization[\"']?[ \t]*[:=][ \t]*[\"']?"
                r"(?:(?P<scheme>bearer|basic|token|digest|negotiate|ntlm|apikey)[ \t]+)?" + _VALUE
            ),
            group="secret",
            accept=_authorization_is_credential,
        ),
        _Detector(
            re.compile(
                r"(?i)(?<![A-Za-z0-9])bearer[ \t]+(?!\[REDACTED:)(?P<secret>[A-Za-z0-9._~+/-]+=*)"
            ),
            group="secret",
            accept=_secret_looks_secret,
        ),
    ),
}


# --- the redactor ----------------------------------------------------------------------


class Redactor:
    """Replaces personal data and secrets with ``[REDACTED:<kind>]``.

    ``kinds`` selects built-in kinds (see the module docstring); ``extra`` adds
    named patterns of your own, ``{"employee_id": r"EMP-\\d{6}"}``, redacted as
    ``[REDACTED:employee_id]`` and taking precedence over the built-in kinds.
    """

    def __init__(
        self,
        *,
        kinds: Iterable[str] = DEFAULT_KINDS,
        extra: Mapping[str, str | re.Pattern[str]] | None = None,
    ) -> None:
        if isinstance(kinds, str):
            raise InvalidInput(
                "kinds", f"must be a collection of kind names, not the string {kinds!r}"
            )
        chosen = list(kinds)
        for kind in chosen:
            if kind not in KINDS:
                raise InvalidInput(
                    "kinds", f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}"
                )
        detectors: list[tuple[str, _Detector]] = [
            (name, _Detector(pattern)) for name, pattern in _compile_extra(extra).items()
        ]
        # Built-in kinds in precedence order, whatever order they were given in.
        detectors += [
            (kind, detector)
            for kind in KINDS
            if kind in chosen
            for detector in _BUILTIN_DETECTORS[kind]
        ]
        self._detectors: Final = tuple(detectors)
        self._credential_keys: Final = "api_key" in chosen

    @property
    def kinds(self) -> tuple[str, ...]:
        """The names this redactor redacts: extra patterns first, then built-in kinds."""
        return tuple(dict.fromkeys(name for name, _ in self._detectors))

    def redact_text(self, text: str) -> str:
        """``text`` with every finding replaced by its marker."""
        if not text:
            return text
        markers = _MarkerEdges.of(text)
        findings = sorted(
            (start, end, precedence)
            for precedence, (_, detector) in enumerate(self._detectors)
            for start, end in detector.spans(text, markers)
        )
        if not findings:
            return text
        pieces: list[str] = []
        position = 0
        merged_start, merged_end, merged_precedence = findings[0]
        for start, end, precedence in findings[1:]:
            if start < merged_end:
                merged_end = max(merged_end, end)
                merged_precedence = min(merged_precedence, precedence)
                continue
            pieces += (text[position:merged_start], _marker(self._detectors[merged_precedence][0]))
            position = merged_end
            merged_start, merged_end, merged_precedence = start, end, precedence
        pieces += (text[position:merged_start], _marker(self._detectors[merged_precedence][0]))
        pieces.append(text[merged_end:])
        return "".join(pieces)

    def redact_blocks(self, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A redacted deep copy of a list of content blocks; ``blocks`` is not changed.

        Redacts ``text`` blocks (and the quoted text of their citations), every
        string inside a ``tool_use`` block's ``input``, a ``tool_result``'s
        content (a string or nested blocks) and ``document`` blocks with a text
        or content source. ``thinking`` and ``redacted_thinking`` blocks (whose
        signatures must stay valid) and block types not named here are copied
        unchanged. Anything but a list (a message's string content, say) is
        :class:`InvalidInput`.
        """
        if not isinstance(blocks, list):
            # A string passed here would come back unredacted: refuse it loudly.
            raise InvalidInput(
                "blocks",
                f"must be a list of content blocks, not {type(blocks).__name__} "
                "(use redact_text for a string)",
            )
        redacted = copy.deepcopy(blocks)
        for block in redacted:
            self._redact_block_in_place(block)
        return redacted

    @overload
    def redact_system(self, system: str) -> str: ...
    @overload
    def redact_system(self, system: list[dict[str, Any]]) -> list[dict[str, Any]]: ...
    @overload
    def redact_system(self, system: None) -> None: ...
    def redact_system(
        self, system: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        """A redacted copy of a system prompt, given as text or as text blocks."""
        if system is None:
            return None
        if isinstance(system, str):
            return self.redact_text(system)
        return self.redact_blocks(system)

    def _redact_block_in_place(self, block: object) -> None:
        if not isinstance(block, dict):
            return
        kind = block.get("type")
        if kind == "text":
            if isinstance(block.get("text"), str):
                block["text"] = self.redact_text(block["text"])
            for citation in block.get("citations") or ():
                if isinstance(citation, dict) and isinstance(citation.get("cited_text"), str):
                    citation["cited_text"] = self.redact_text(citation["cited_text"])
        elif isinstance(kind, str) and kind.endswith("tool_use"):
            # tool_use, server_tool_use, mcp_tool_use: the model's input to a tool.
            if "input" in block:
                block["input"] = self.redact_json(block["input"])
        elif kind == "tool_result":
            self._redact_content_in_place(block)
        elif kind == "search_result":
            if isinstance(block.get("title"), str):
                block["title"] = self.redact_text(block["title"])
            self._redact_content_in_place(block)
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict):
                if source.get("type") == "text" and isinstance(source.get("data"), str):
                    source["data"] = self.redact_text(source["data"])
                elif source.get("type") == "content":
                    self._redact_content_in_place(source)

    def _redact_content_in_place(self, holder: dict[str, Any]) -> None:
        """Redact ``holder["content"]``: a string, or a list of blocks."""
        content = holder.get("content")
        if isinstance(content, str):
            holder["content"] = self.redact_text(content)
        elif isinstance(content, list):
            for block in content:
                self._redact_block_in_place(block)

    def redact_json(self, value: Any) -> Any:
        """A redacted copy of a JSON value (a tool input, metadata); keys are kept.

        Every string is redacted, and the whole value of a key that names a
        credential (``password``, ``api_key``, ``client_secret``, ...) is
        replaced, whatever it looks like: ``{"password": "hunter2"}``.
        """
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, list):
            return [self.redact_json(item) for item in value]
        if isinstance(value, dict):
            return {key: self._redact_member(key, item) for key, item in value.items()}
        return value

    def _redact_member(self, key: Any, value: Any) -> Any:
        if (
            self._credential_keys
            and isinstance(key, str)
            and _CREDENTIAL_KEY.fullmatch(key)
            and isinstance(value, str | int | float)
            and not isinstance(value, bool)
            and str(value).strip()
            and not _MARKER.fullmatch(str(value))
        ):
            return _marker("api_key")
        return self.redact_json(value)


def _compile_extra(
    extra: Mapping[str, str | re.Pattern[str]] | None,
) -> dict[str, re.Pattern[str]]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise InvalidInput("extra", "must be a mapping of name to regular expression")
    compiled: dict[str, re.Pattern[str]] = {}
    for name, pattern in extra.items():
        field = f"extra[{name!r}]"
        if not isinstance(name, str) or not _EXTRA_NAME.fullmatch(name):
            raise InvalidInput(
                field, "a name must start with a letter and hold only letters, digits, _ and -"
            )
        if name in KINDS:
            raise InvalidInput(field, f"{name!r} is a built-in kind; choose another name")
        if isinstance(pattern, re.Pattern):
            if not isinstance(pattern.pattern, str):
                raise InvalidInput(field, "must be a text (str) pattern, not bytes")
            regex = pattern
        elif isinstance(pattern, str):
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise InvalidInput(field, f"not a valid regular expression: {exc}") from None
        else:
            raise InvalidInput(field, f"must be a str or re.Pattern, not {type(pattern).__name__}")
        if regex.fullmatch("") is not None:
            raise InvalidInput(field, "matches the empty string, so it would redact nothing")
        markers = (_marker(kind) for kind in (*KINDS, *extra))
        if any(found.group() for text in markers for found in regex.finditer(text)):
            raise InvalidInput(field, f"matches a redaction marker such as {_marker(name)!r}")
        compiled[name] = regex
    return compiled
