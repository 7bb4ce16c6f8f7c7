"""convo: durable, budget-aware multi-turn conversations for the Claude Messages API.

>>> from convo import ConversationStore
>>> store = ConversationStore()            # CONVO_DATABASE_URL, else embedded SQLite
>>> conv = store.create(system="You are terse.")
>>> reply = conv.send("Hello!")            # stored, within budget, cached
>>> store.get(conv.id).history()           # from any process, on any host

``AsyncConversationStore`` is the same store for asyncio apps, awaited.
"""

import logging
from typing import TYPE_CHECKING

from . import errors

# A library logs; the application decides where records go (none reach stderr by default).
logging.getLogger("convo").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from ._aio import AsyncConversation, AsyncConversationStore, AsyncConversationStream
    from ._conversation import Conversation
    from ._message import Message
    from ._pricing import DEFAULT_PRICES, Price, PriceTable
    from ._recall import RecallHit
    from ._redaction import Redactor
    from ._sending import ConversationStream
    from ._store import Compaction, ConversationStore
    from ._summarizer import (
        ClaudeSummarizer,
        ExtractiveSummarizer,
        Summarizer,
        SummaryResult,
        SummaryTurn,
        TranscriptLimits,
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
        CorruptedData,
        DatabaseError,
        DatabaseUnavailable,
        ExportFailed,
        InvalidInput,
        InvalidMessage,
        MessageTooLarge,
        MissingAPIKey,
        MissingDriver,
        NotAConvoDatabase,
        ReplyNotStored,
        SchemaOutOfDate,
        SendTimedOut,
        StreamInterrupted,
        SummarizerFailed,
    )

#: Where each public name lives: imported on first use, so ``import convo`` (and the
#: ``convo`` command's startup) does not pay for SQLAlchemy or the SDK until needed.
_LAZY = {
    "AsyncConversation": "._aio",
    "AsyncConversationStore": "._aio",
    "AsyncConversationStream": "._aio",
    "Conversation": "._conversation",
    "Message": "._message",
    "DEFAULT_PRICES": "._pricing",
    "Price": "._pricing",
    "PriceTable": "._pricing",
    "RecallHit": "._recall",
    "Redactor": "._redaction",
    "ConversationStream": "._sending",
    "Compaction": "._store",
    "ConversationStore": "._store",
    "ClaudeSummarizer": "._summarizer",
    "ExtractiveSummarizer": "._summarizer",
    "Summarizer": "._summarizer",
    "SummaryResult": "._summarizer",
    "SummaryTurn": "._summarizer",
    "TranscriptLimits": "._summarizer",
    "TiktokenCounter": "._tokens",
    "TokenCounter": "._tokens",
    "UsageReport": "._usage",
    "UsageStats": "._usage",
    "__version__": "._version",
    "ContextWindow": "._window",
    "APIError": ".errors",
    "ArchiveCorrupted": ".errors",
    "ContextTooLarge": ".errors",
    "ConversationBusy": ".errors",
    "ConversationNotFound": ".errors",
    "ConvoError": ".errors",
    "CorruptedData": ".errors",
    "DatabaseError": ".errors",
    "DatabaseUnavailable": ".errors",
    "ExportFailed": ".errors",
    "InvalidInput": ".errors",
    "InvalidMessage": ".errors",
    "MessageTooLarge": ".errors",
    "MissingAPIKey": ".errors",
    "MissingDriver": ".errors",
    "NotAConvoDatabase": ".errors",
    "ReplyNotStored": ".errors",
    "SchemaOutOfDate": ".errors",
    "SendTimedOut": ".errors",
    "StreamInterrupted": ".errors",
    "SummarizerFailed": ".errors",
}

__all__ = [
    "DEFAULT_PRICES",
    "APIError",
    "ArchiveCorrupted",
    "AsyncConversation",
    "AsyncConversationStore",
    "AsyncConversationStream",
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
    "CorruptedData",
    "DatabaseError",
    "DatabaseUnavailable",
    "ExportFailed",
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
    "RecallHit",
    "Redactor",
    "ReplyNotStored",
    "SchemaOutOfDate",
    "SendTimedOut",
    "StreamInterrupted",
    "Summarizer",
    "SummarizerFailed",
    "SummaryResult",
    "SummaryTurn",
    "TiktokenCounter",
    "TokenCounter",
    "TranscriptLimits",
    "UsageReport",
    "UsageStats",
    "__version__",
    "errors",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'convo' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
