"""convo: durable, budget-aware multi-turn conversations for the Claude Messages API.

>>> from convo import ConversationStore
>>> store = ConversationStore()            # CONVO_DATABASE_URL, else embedded SQLite
>>> conv = store.create(system="You are terse.")
>>> conv.add("user", "Hello!")
>>> store.get(conv.id).history()           # from any process, on any host
"""

from ._message import Message
from ._store import Conversation, ConversationStore
from ._tokens import TiktokenCounter, TokenCounter
from ._version import __version__
from .errors import (
    ConversationNotFound,
    ConvoError,
    DatabaseError,
    DatabaseUnavailable,
    InvalidInput,
    InvalidMessage,
    MissingDriver,
    NotAConvoDatabase,
    SchemaOutOfDate,
)

__all__ = [
    "Conversation",
    "ConversationNotFound",
    "ConversationStore",
    "ConvoError",
    "DatabaseError",
    "DatabaseUnavailable",
    "InvalidInput",
    "InvalidMessage",
    "Message",
    "MissingDriver",
    "NotAConvoDatabase",
    "SchemaOutOfDate",
    "TiktokenCounter",
    "TokenCounter",
    "__version__",
]
