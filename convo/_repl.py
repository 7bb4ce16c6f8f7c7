"""``convo chat``: the interactive loop, with line editing, history and multi-line input.

Input is read with GNU readline when standard input is a terminal: arrow keys
edit the line, up-arrow recalls earlier inputs (kept in ``chat_history`` in
the user data directory), and a paste of several lines arrives as one input
(bracketed paste). Anywhere, a line ending in ``\\`` continues on the next
line, and a line that is just ``\"\"\"`` starts a block that runs to the next
such line. Terminal escape sequences never reach a stored turn.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from ._humanize import plural

if TYPE_CHECKING:
    from ._conversation import Conversation
    from ._message import Message

#: Turns shown when a chat resumes a conversation.
RESUME_TURNS: Final = 4
HISTORY_LENGTH: Final = 1_000
BLOCK: Final = '"""'
_HISTORY_HEADER: Final = "#convo chat history 1"

HELP: Final = """Commands:
  /id                 this conversation's id
  /model [NAME]       show or change the model
  /system [TEXT]      show or change the system prompt (/system - clears it)
  /title [TEXT]       show or change the title
  /context            what the next request carries, with token counts
  /compact            archive and summarize older turns now
  /regenerate         take back the last reply and ask again
  /stats              usage and cost of this conversation
  /exit               leave (or Ctrl-D)
A line ending in \\ continues on the next line; \"\"\" on its own line starts and
ends a multi-line block; a pasted block is one message. Up-arrow recalls earlier
inputs. Ctrl-C while a reply streams stops it; its text so far is kept."""

# CSI and other escape sequences, and control characters except tab and newline.
_ESCAPES: Final = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_][0-?]*[ -/]*[@-~]?|\x9b[0-?]*[@-~]")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_input(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (tab, newline kept)."""
    return _CONTROL.sub("", _ESCAPES.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))


def read_message(read_line: Callable[[str], str], prompt: str, more: str) -> str:
    """One message from ``read_line``: a line, ``\\``-continued lines, or a \"\"\" block.

    ``read_line(prompt)`` returns a line without its newline and raises
    ``EOFError`` at the end of input (a block cut off by it is returned as is).
    """
    first = clean_input(read_line(prompt))
    if first.strip() == BLOCK:
        lines: list[str] = []
        while True:
            try:
                line = clean_input(read_line(more))
            except EOFError:
                break
            if line.strip() == BLOCK:
                break
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\") and not lines[-1].endswith("\\\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(clean_input(read_line(more)))
        except EOFError:
            break
    return "\n".join(lines)


def history_file() -> Path:
    import platformdirs

    return platformdirs.user_data_path("convo", appauthor=False) / "chat_history"


class LineReader:
    """``input()`` with readline on a terminal (history persisted), plain otherwise."""

    def __init__(self, *, interactive: bool) -> None:
        self.readline: Any = None
        self.start = 0
        self.path = history_file()
        if interactive:
            try:
                import readline
            except ImportError:  # pragma: no cover - Windows without pyreadline
                return
            self.readline = readline
            readline.set_history_length(HISTORY_LENGTH)
            readline.parse_and_bind("set enable-bracketed-paste on")
            for entry in load_history(self.path):
                readline.add_history(entry)

    def prompt(self, text: str, **style: Any) -> str:
        """A prompt, coloured on a terminal (wrapped so readline measures it right)."""
        if not style or not colour_enabled():
            return text
        styled = click.style(text, **style)
        if self.readline is None:
            return styled
        return re.sub(r"(\x1b\[[0-9;]*m)", "\x01\\1\x02", styled)

    def __call__(self, prompt: str) -> str:
        return input(prompt)

    def begin(self) -> None:
        """Mark where the next message's lines start in the history."""
        self.start = self.readline.get_current_history_length() if self.readline else 0

    def remember(self, message: str) -> None:
        """Keep the message just read as one history entry, then save the history."""
        if self.readline is None:
            return
        # input() added each line it read; one entry for the whole message instead.
        while self.readline.get_current_history_length() > self.start:
            self.readline.remove_history_item(self.readline.get_current_history_length() - 1)
        if message.strip():
            self.readline.add_history(message)
        count = self.readline.get_current_history_length()
        entries = [self.readline.get_history_item(i) for i in range(1, count + 1)]
        with contextlib.suppress(OSError):
            save_history(self.path, [e for e in entries if e is not None])


def load_history(path: Path) -> list[str]:
    """The chat's input history, oldest first; a message of several lines is one entry.

    The file is a header line, then one JSON string per entry (readline's own
    file format has one line per entry, which would split such a message). A
    file without the header is readline's format, as older versions wrote it.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    if not lines or lines[0] != _HISTORY_HEADER:
        return lines[-HISTORY_LENGTH:]
    entries = []
    for line in lines[1:]:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, str):
                entries.append(entry)
    return entries[-HISTORY_LENGTH:]


def save_history(path: Path, entries: list[str]) -> None:
    """Write the history (see :func:`load_history`) by replacing the file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = entries[-HISTORY_LENGTH:]
    text = "\n".join([_HISTORY_HEADER, *(json.dumps(e, ensure_ascii=False) for e in kept)])
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    partial.replace(path)


def colour_enabled() -> bool:
    """Colours only for a terminal, and never with NO_COLOR set."""
    import os
    import sys

    return not os.environ.get("NO_COLOR") and sys.stdout.isatty()


def styled(text: str, **style: Any) -> str:
    return click.style(text, **style) if colour_enabled() else text


def render_turn(message: Message, text: str) -> str:
    who = "you" if message.role == "user" else "claude"
    return f"{styled(who + '>', fg='green' if who == 'you' else 'blue', bold=True)} {text}"


def recent_turns(conv: Conversation, count: int = RESUME_TURNS) -> Iterator[Message]:
    """The last ``count`` turns of ``conv`` (read without walking the whole history)."""
    return conv.store.records.history(conv.id, after=max(0, conv.message_count - count))


def describe(conv: Conversation) -> str:
    title = f" - {conv.title}" if conv.title else ""
    return f"{conv.id}{title} ({plural(conv.message_count, 'turn')}, {conv.effective_model})"
