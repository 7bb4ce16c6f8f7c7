"""Summarizers: the rolling summary that stands in for archived turns.

Each compaction asks a summarizer for a new summary from the previous one
plus the turns being archived. ``ClaudeSummarizer`` asks Claude (the
cheapest current model by default); ``ExtractiveSummarizer`` works offline
and deterministically, and says so in its text. Plug in your own with any
object that has the ``summarize`` method of :class:`Summarizer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from ._content import Block

DEFAULT_SUMMARIZER_MODEL: Final = "claude-haiku-5-5"

SUMMARIZER_SYSTEM: Final = (
    "You maintain the running summary of a long conversation between a user and an AI "
    "assistant. The summary replaces the turns it covers, so keep everything the assistant "
    "will need to continue faithfully: the user's goals, facts and preferences they stated, "
    "decisions made, names, numbers, code identifiers, open questions and promised follow-ups, "
    "and the results of tool calls that still matter. Drop pleasantries and repetition. Write "
    "compact prose or bullet points in the conversation's language. Output only the summary."
)


@dataclass(frozen=True, slots=True)
class SummaryTurn:
    """A turn handed to a summarizer."""

    seq: int
    role: str
    content: list[Block]


@dataclass(frozen=True, slots=True)
class SummaryResult:
    """A new summary, and what making it cost when a model made it."""

    text: str
    model: str | None = None
    usage: dict[str, Any] | None = None
    summarizer: str = "custom"


@runtime_checkable
class Summarizer(Protocol):
    """Makes the next rolling summary. Return a string or a :class:`SummaryResult`."""

    def summarize(
        self, previous: str | None, turns: Sequence[SummaryTurn]
    ) -> str | SummaryResult: ...


def transcript(turns: Sequence[SummaryTurn]) -> str:
    """A plain-text rendering of turns, tool calls and results included."""
    lines = []
    for turn in turns:
        parts = []
        for block in turn.content:
            kind = block.get("type")
            if kind == "text":
                parts.append(block.get("text", ""))
            elif kind == "tool_use":
                arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
                parts.append(f"[calls tool {block.get('name')} with {arguments}]")
            elif kind == "tool_result":
                content = block.get("content")
                if isinstance(content, list):
                    content = " ".join(b.get("text", "") for b in content if isinstance(b, dict))
                error = " (error)" if block.get("is_error") else ""
                parts.append(f"[tool result{error}: {content or ''}]")
            elif kind in ("thinking", "redacted_thinking"):
                continue
            else:
                parts.append(f"[{kind} block]")
        lines.append(f"{turn.role.upper()} (turn {turn.seq}): {' '.join(parts).strip()}")
    return "\n\n".join(lines)


class ClaudeSummarizer:
    """Summaries written by Claude through an ``anthropic`` client.

    ``client`` is the client, or a function that returns it: then it is made
    only when a summary is needed (and a missing API key is a summarizer
    failure, not an error at start-up).
    """

    def __init__(
        self, client: Any, *, model: str = DEFAULT_SUMMARIZER_MODEL, max_tokens: int = 2_048
    ) -> None:
        self._client = client
        self.model = model
        self.max_tokens = max_tokens

    @property
    def client(self) -> Any:
        if callable(self._client) and not hasattr(self._client, "messages"):
            self._client = self._client()
        return self._client

    def summarize(self, previous: str | None, turns: Sequence[SummaryTurn]) -> SummaryResult:
        earlier = previous or "(none yet: these are the first turns to be summarized)"
        prompt = (
            f"<previous_summary>\n{earlier}\n</previous_summary>\n\n"
            f"<new_turns>\n{transcript(turns)}\n</new_turns>\n\n"
            "Write the updated summary covering the previous summary and the new turns."
        )
        response = self.client.messages.create(
            model=self.model,
            max_tokens=self.max_tokens,
            system=SUMMARIZER_SYSTEM,
            messages=[{"role": "user", "content": prompt}],
        )
        text = "".join(b.text for b in response.content if getattr(b, "type", None) == "text")
        if not text.strip():
            raise ValueError("the summarizer model returned no text")
        usage = None
        if response.usage is not None:
            usage = response.usage.model_dump(mode="json", exclude_none=True)
        return SummaryResult(text.strip(), model=response.model, usage=usage, summarizer="claude")


class ExtractiveSummarizer:
    """An offline, deterministic summary: the opening words of every archived turn.

    It makes no API call and its text says that it is extractive. Older lines
    are dropped first when the summary would pass ``max_chars``.
    """

    HEADER: Final = (
        "[Extractive summary: the opening words of each earlier turn, not a model summary.]"
    )

    def __init__(self, *, chars_per_turn: int = 200, max_chars: int = 8_000) -> None:
        self.chars_per_turn = chars_per_turn
        self.max_chars = max_chars

    def summarize(self, previous: str | None, turns: Sequence[SummaryTurn]) -> SummaryResult:
        lines = [] if previous is None else previous.splitlines()
        if lines and lines[0] == self.HEADER:
            lines = lines[1:]
        for turn in turns:
            text = " ".join(transcript([turn]).split(": ", 1)[-1].split())
            if len(text) > self.chars_per_turn:
                text = text[: self.chars_per_turn - 1].rstrip() + "…"
            if text:
                lines.append(f"- {turn.role} (turn {turn.seq}): {text}")
        while lines and len(self.HEADER) + sum(len(line) + 1 for line in lines) > self.max_chars:
            lines.pop(0)
        return SummaryResult("\n".join([self.HEADER, *lines]), summarizer="extractive")
