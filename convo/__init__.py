"""convo: durable, budget-aware multi-turn conversations for the Claude Messages API.

>>> from convo import ConversationStore
>>> store = ConversationStore()            # CONVO_DATABASE_URL, else embedded SQLite
>>> conv = store.create(system="You are terse.")
>>> reply = conv.send("Hello!")            # stored, within budget, cached
>>> store.get(conv.id).history()           # from any process, on any host
"""

from . import errors
from ._conversation import Conversation
from ._message import Message
from ._pricing import DEFAULT_PRICES, Price, PriceTable
from ._redaction import Redactor
from ._sending import ConversationStream
from ._store import Compaction, ConversationStore
from ._summarizer import (
    ClaudeSummarizer,
    ExtractiveSummarizer,
    Summarizer,
    SummaryResult,
    SummaryTurn,
)
from ._tokens import TiktokenCounter, TokenCounter
from ._usage import UsageReport, UsageStats
from ._version import __version__
from ._window import ContextWindow
from .errors import (
    APIError,
    ArchiveCorrupted,
    ContextTooLarge,
    ConversationBusy,
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
    StreamInterrupted,
    SummarizerFailed,
)

__all__ = [
    "DEFAULT_PRICES",
    "APIError",
    "ArchiveCorrupted",
    "ClaudeSummarizer",
    "Compaction",
    "ContextTooLarge",
    "ContextWindow",
    "Conversation",
    "ConversationBusy",
    "ConversationNotFound",
    "ConversationStore",
    "ConversationStream",
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
    "Price",
    "PriceTable",
    "Redactor",
    "SchemaOutOfDate",
    "StreamInterrupted",
    "Summarizer",
    "SummarizerFailed",
    "SummaryResult",
    "SummaryTurn",
    "TiktokenCounter",
    "TokenCounter",
    "UsageReport",
    "UsageStats",
    "__version__",
    "errors",
]
