"""convo: durable, budget-aware multi-turn conversations for the Claude Messages API.

>>> from convo import ConversationStore
>>> store = ConversationStore()            # CONVO_DATABASE_URL, else embedded SQLite
>>> conv = store.create(system="You are terse.")
>>> conv.add("user", "Hello!")
>>> store.get(conv.id).history()           # from any process, on any host
"""

from ._conversation import Conversation
from ._message import Message
from ._store import Compaction, ConversationStore
from ._summarizer import (
    ClaudeSummarizer,
    ExtractiveSummarizer,
    Summarizer,
    SummaryResult,
    SummaryTurn,
)
from ._tokens import TiktokenCounter, TokenCounter
from ._version import __version__
from ._window import ContextWindow
from .errors import (
    ArchiveCorrupted,
    ContextTooLarge,
    ConversationNotFound,
    ConvoError,
    DatabaseError,
    DatabaseUnavailable,
    InvalidInput,
    InvalidMessage,
    MessageTooLarge,
    MissingAPIKey,
    MissingDriver,
    NotAConvoDatabase,
    SchemaOutOfDate,
    SummarizerFailed,
)

__all__ = [
    "ArchiveCorrupted",
    "ClaudeSummarizer",
    "Compaction",
    "ContextTooLarge",
    "ContextWindow",
    "Conversation",
    "ConversationNotFound",
    "ConversationStore",
    "ConvoError",
    "DatabaseError",
    "DatabaseUnavailable",
    "ExtractiveSummarizer",
    "InvalidInput",
    "InvalidMessage",
    "Message",
    "MessageTooLarge",
    "MissingAPIKey",
    "MissingDriver",
    "NotAConvoDatabase",
    "SchemaOutOfDate",
    "Summarizer",
    "SummarizerFailed",
    "SummaryResult",
    "SummaryTurn",
    "TiktokenCounter",
    "TokenCounter",
    "__version__",
]
