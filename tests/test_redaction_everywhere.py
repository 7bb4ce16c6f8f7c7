"""Redaction reaches every place a secret can go: each request convo makes, each stored string.

One secret of every built-in kind is planted in every place a caller can put
text (system prompt, title, metadata, user turns, tool inputs and their keys,
server tool inputs, search results inside tool results, replies); then the
raw bytes of every request the fake API received, of the database (its
files, on SQLite, or every table's rows), of the search index and of every
export format are searched for each secret.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import anthropic
import pytest
from sqlalchemy import inspect, text

from convo._export import FORMATS, export_history
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI, Reply

pytestmark = pytest.mark.faces

SECRETS = {
    "card": "4111 1111 1111 1111",
    "card_dots": "5500.0000.0000.0004",
    "card_fullwidth": "\uff14\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11\uff11"
    "\uff11\uff11\uff11\uff11",
    "ssn": "123-45-6789",
    "email": "ada.lovelace@example.com",
    "email_idn": "jos\u00e9@b\u00fccher.de",
    "phone": "+44 20 7946 0958",
    "api_key": "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789",
    "bearer": "Bearer eyJhbGciOiJIUzI1NiJ9.payload123.signature456",
    "password_value": "hunter2",
}


def _everything(secret: str) -> str:
    return f"note {secret} end"


def _plant(store: ConversationStore) -> str:
    # Free text gets every kind a pattern can find; the bare password only makes
    # sense as the value of a key that names it.
    everything = " ; ".join(_everything(s) for k, s in SECRETS.items() if k != "password_value")
    conv = store.create(
        system=f"You help. Context: {everything}",
        title=f"Ticket {SECRETS['email']} {SECRETS['card']}",
        metadata={"contact": everything, "nested": {"password": SECRETS["password_value"]}},
    )
    conv.add("user", everything)
    conv.add(
        "assistant",
        [
            {"type": "text", "text": "Looking it up."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "lookup",
                "input": {"q": everything, "password": SECRETS["password_value"]},
            },
            {
                "type": "server_tool_use",
                "id": "srvtoolu_1",
                "name": "web_search",
                "input": {"query": everything},
            },
        ],
    )
    conv.add(
        "user",
        [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [
                    {
                        "type": "search_result",
                        "source": "https://intranet.example/ticket",
                        "title": _everything(SECRETS["ssn"]),
                        "content": [{"type": "text", "text": everything}],
                    }
                ],
            },
            {"type": "text", "text": "What did you find?"},
        ],
    )
    return conv.id


def _leaks(haystack: str) -> list[str]:
    return [kind for kind, secret in SECRETS.items() if secret in haystack]


def _database_dump(store: ConversationStore, url: str) -> str:
    parts = []
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else None
    if path:
        for file in Path(path).parent.glob(Path(path).name + "*"):
            parts.append(file.read_bytes().decode("utf-8", "replace"))
    with store.database.transaction() as session:
        for table in inspect(session.connection()).get_table_names():
            if table.startswith("convo_"):
                rows = session.execute(text(f"SELECT * FROM {table}")).all()
                parts.append(json.dumps([list(map(str, row)) for row in rows], ensure_ascii=False))
    return "\n".join(parts)


def test_redact_requests_covers_every_request(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(
        migrated_url, client=api_client, redact_requests=True, exact_token_counts=True
    ) as store:
        conv = store.get(_plant(store))
        fake_api.queue_reply(Reply(text="Found it."))
        conv.send("Please go on.")
        conv.compact()  # the summarizer's request leaves redacted too
        paths = {request.path for request in fake_api.requests}
        assert paths == {"/v1/messages", "/v1/messages/count_tokens"}
        summarizer_requests = [
            r for r in fake_api.requests if "maintain the running summary" in json.dumps(r.body)
        ]
        assert summarizer_requests, "compaction made no summarizer request"
        sent = json.dumps([r.body for r in fake_api.requests], ensure_ascii=False)
        assert _leaks(sent) == []
        assert "[REDACTED:" in sent
        # redact_requests alone leaves what is stored as it was written.
        assert _leaks(_database_dump(store, migrated_url)) != []


def test_redact_storage_covers_every_stored_string(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    with ConversationStore(migrated_url, client=api_client, redact_storage=True) as store:
        conversation_id = _plant(store)
        conv = store.get(conversation_id)
        fake_api.queue_reply(Reply(text=f"I mailed {SECRETS['email']} about it."))
        conv.send("Please go on.")
        conv.update(title=f"Renamed for {SECRETS['phone']}")
        # Every table's rows, the search index (convo_search) included, and the files.
        assert _leaks(_database_dump(store, migrated_url)) == []
        for format in FORMATS:
            out = io.StringIO()
            export_history(store, out, conversation_ids=[conversation_id], format=format)
            assert _leaks(out.getvalue()) == [], format
