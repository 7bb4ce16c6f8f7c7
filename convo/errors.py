"""Every error convo raises, in one hierarchy.

Catch :class:`ConvoError` to handle them all. Bad input is also a
:class:`ValueError` and a missing conversation is also a :class:`LookupError`,
so code written against the built-in exceptions keeps working::

    ConvoError
    ├── ConversationNotFound          (LookupError)  no conversation has that id
    ├── InvalidInput                  (ValueError)   bad argument; nothing was written
    │   ├── InvalidMessage                           bad role or content; names the field
    │   └── MessageTooLarge                          a turn cannot fit the budget even alone
    ├── ContextTooLarge                              the newest exchange alone is over budget
    ├── ConversationBusy                             another send on it is in flight
    ├── APIError                                     the API call failed (wraps the SDK's error)
    │   ├── StreamInterrupted                        a stream broke off; partial reply kept
    │   └── SendTimedOut                             send_timeout passed before a reply came
    ├── MissingAPIKey                                no key for the client convo makes
    ├── SummarizerFailed                             the summary could not be made; turns stay live
    ├── CorruptedData                                stored data fails a check; see `convo verify`
    │   ├── ArchiveCorrupted                         an archive block fails its checksum
    │   └── ExportFailed                             a conversation could not be exported
    └── DatabaseError                                the database cannot be used
        ├── DatabaseUnavailable                      cannot connect (password masked)
        │   └── ReplyNotStored                       a billed reply is kept in the outbox
        ├── MissingDriver                            the URL's driver extra is missing
        ├── NotAConvoDatabase                        not convo's; left untouched
        └── SchemaOutOfDate                          run `convo db upgrade`

Each error's message is complete on its own: the CLI prints it as it is.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "APIError",
    "ArchiveCorrupted",
    "ContextTooLarge",
    "ConversationBusy",
    "ConversationNotFound",
    "ConvoError",
    "CorruptedData",
    "DatabaseError",
    "DatabaseUnavailable",
    "ExportFailed",
    "InvalidInput",
    "InvalidMessage",
    "MessageTooLarge",
    "MissingAPIKey",
    "MissingDriver",
    "NotAConvoDatabase",
    "ReplyNotStored",
    "SchemaOutOfDate",
    "SendTimedOut",
    "StreamInterrupted",
    "SummarizerFailed",
]


class ConvoError(Exception):
    """Base class of every error raised by convo."""


class ConversationNotFound(ConvoError, LookupError):
    """No conversation with this id exists in the store."""

    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"conversation not found: {conversation_id!r}")
        self.conversation_id = conversation_id


class InvalidInput(ConvoError, ValueError):
    """An argument is not acceptable. Nothing was written."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidMessage(InvalidInput):
    """A message's role or content is not a valid Messages API turn.

    ``field`` is a path into the message, as the API names it, for example
    ``content[2].tool_use_id``.
    """


class MessageTooLarge(InvalidInput):
    """A single turn is larger than the token budget allows for a whole request."""


class ContextTooLarge(ConvoError):
    """Even the newest exchange alone (a tool loop, say) is over the token budget.

    Raised before any API call.
    """


class CorruptedData(ConvoError):
    """Something stored cannot be read back as convo wrote it (damaged outside convo).

    Raised instead of returning wrong data; nothing is changed. ``convo verify``
    lists every damaged conversation.
    """


class ArchiveCorrupted(CorruptedData):
    """An archive block cannot be decoded or fails its checksum.

    Raised instead of returning a history with turns missing.
    """

    def __init__(self, conversation_id: str, first_seq: int, last_seq: int, problem: str) -> None:
        super().__init__(
            f"archive block of conversation {conversation_id} (turns {first_seq}-{last_seq}) "
            f"is corrupted: {problem}"
        )
        self.conversation_id = conversation_id
        self.first_seq = first_seq
        self.last_seq = last_seq


class ExportFailed(CorruptedData):
    """A stored conversation could not be read for export (corrupted data).

    The export stops; the CLI keeps no partial file. ``skip_bad`` (``--skip-bad``)
    exports the others instead and reports this one.
    """

    def __init__(self, conversation_id: str, problem: str) -> None:
        super().__init__(f"conversation {conversation_id} cannot be exported: {problem}")
        self.conversation_id = conversation_id
        self.problem = problem


class SummarizerFailed(ConvoError):
    """Summarising turns for compaction failed. No turn was archived or lost."""


class MissingAPIKey(ConvoError):
    """convo needs to call the API but no key is configured (``ANTHROPIC_API_KEY``)."""


class ConversationBusy(ConvoError):
    """Another ``send``/``stream`` on this conversation is in flight (in any process).

    Nothing was written. Retry when it has finished; a crashed sender's claim
    expires after the store's ``send_lease`` seconds.
    """

    def __init__(self, conversation_id: str, until: datetime) -> None:
        left = max(0, math.ceil((until - datetime.now(UTC)).total_seconds()))
        super().__init__(
            f"conversation {conversation_id} is busy: another send is in flight. Its claim "
            f"expires at {until:%Y-%m-%d %H:%M:%S} UTC (in {left} s) unless its sender, if "
            f"alive, renews it. If that sender is dead, clear it now with "
            f"`convo unlock {conversation_id}` or conv.release_claim(force=True)"
        )
        self.conversation_id = conversation_id
        self.until = until


class APIError(ConvoError):
    """The Messages API call failed after the SDK's retries.

    The SDK's exception is ``__cause__``; ``status_code``, ``error_type`` and
    ``request_id`` are copied from it when it had them. The user turn stays
    stored (marked ``failed``) and is sent again with the next turn.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = error_type
        self.request_id = request_id
        #: For a 400 that names one message of the request: the stored turns
        #: (seqs) it was made from; ``conv.exclude(seq)`` leaves one out.
        self.turn_seqs: tuple[int, ...] = ()


class StreamInterrupted(APIError):
    """A streamed reply broke off. What arrived is stored as an incomplete turn."""


class SendTimedOut(APIError):
    """The store's ``send_timeout`` passed before the API call produced a reply.

    The user turn stays stored (marked ``failed``) and is sent again with the
    next turn. (A stream already under way at the deadline is closed and kept
    as an incomplete turn: :class:`StreamInterrupted`.)
    """


class DatabaseError(ConvoError):
    """The database cannot be used as it is."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached, or refused the connection."""


class ReplyNotStored(DatabaseUnavailable):
    """The API replied (and billed) but the database failed before the reply was written.

    ``reply`` is the reply as it would have been stored (its ``seq`` is 0:
    it has none yet). It is also kept durably in the store's outbox, a local
    file, and written into the conversation on the next use of the store once
    the database is back (or by ``convo outbox replay``); ``outbox_id`` names
    it there.
    """

    def __init__(self, message: str, *, reply: Any, outbox_id: str | None) -> None:
        super().__init__(message)
        self.reply = reply
        self.outbox_id = outbox_id


class MissingDriver(DatabaseError):
    """The database URL needs a driver package that is not installed."""


class NotAConvoDatabase(DatabaseError):
    """The database holds something other than convo's tables; it was not modified."""


class SchemaOutOfDate(DatabaseError):
    """The database schema is behind (or ahead of) this version of convo."""
