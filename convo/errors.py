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
    │   └── StreamInterrupted                        a stream broke off; partial reply kept
    ├── MissingAPIKey                                no key for the client convo makes
    ├── SummarizerFailed                             the summary could not be made; turns stay live
    ├── ArchiveCorrupted                             an archive block fails its checksum
    └── DatabaseError                                the database cannot be used
        ├── DatabaseUnavailable                      cannot connect (password masked)
        ├── MissingDriver                            the URL's driver extra is missing
        ├── NotAConvoDatabase                        not convo's; left untouched
        └── SchemaOutOfDate                          run `convo db upgrade`

Each error's message is complete on its own: the CLI prints it as it is.
"""

from __future__ import annotations

__all__ = [
    "APIError",
    "ArchiveCorrupted",
    "ContextTooLarge",
    "ConversationBusy",
    "ConversationNotFound",
    "ConvoError",
    "DatabaseError",
    "DatabaseUnavailable",
    "InvalidInput",
    "InvalidMessage",
    "MessageTooLarge",
    "MissingAPIKey",
    "MissingDriver",
    "NotAConvoDatabase",
    "SchemaOutOfDate",
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


class ArchiveCorrupted(ConvoError):
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


class SummarizerFailed(ConvoError):
    """Summarising turns for compaction failed. No turn was archived or lost."""


class MissingAPIKey(ConvoError):
    """convo needs to call the API but no key is configured (``ANTHROPIC_API_KEY``)."""


class ConversationBusy(ConvoError):
    """Another ``send``/``stream`` on this conversation is in flight (in any process).

    Nothing was written. Retry when it has finished; a crashed sender's claim
    expires after the store's ``send_lease`` seconds.
    """

    def __init__(self, conversation_id: str, until: object) -> None:
        super().__init__(
            f"conversation {conversation_id} is busy: another send is in flight "
            f"(its claim expires at {until})"
        )
        self.conversation_id = conversation_id


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


class StreamInterrupted(APIError):
    """A streamed reply broke off. What arrived is stored as an incomplete turn."""


class DatabaseError(ConvoError):
    """The database cannot be used as it is."""


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached, or refused the connection."""


class MissingDriver(DatabaseError):
    """The database URL needs a driver package that is not installed."""


class NotAConvoDatabase(DatabaseError):
    """The database holds something other than convo's tables; it was not modified."""


class SchemaOutOfDate(DatabaseError):
    """The database schema is behind (or ahead of) this version of convo."""
