"""examples/fastapi_app.py, driven over HTTP against the fake Messages API."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import httpx2 as httpx
import pytest

from convo import AsyncConversationStore, ConversationStore
from tests.fakeapi import FakeMessagesAPI

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _events(body: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def _app(example: ModuleType, url: str, fake: FakeMessagesAPI) -> Any:
    def open_store() -> AsyncConversationStore:
        client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="test-key")
        store = AsyncConversationStore(url, client=client)
        close_store = store.aclose

        async def aclose() -> None:  # the app's store closes the client the test gave it
            await close_store()
            await client.close()

        store.aclose = aclose  # type: ignore[method-assign]
        return store

    return example.create_app(open_store)


def test_create_send_streamed_and_read_back(
    example: ModuleType, migrated_url: str, fake_api: FakeMessagesAPI
) -> None:
    app = _app(example, migrated_url, fake_api)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://app") as http,
        ):
            created = await http.post("/conversations", json={"system": "Be brief.", "title": "t"})
            assert created.status_code == 201
            conversation_id = created.json()["id"]

            sent = await http.post(
                f"/conversations/{conversation_id}/messages", json={"content": "Hello there"}
            )
            assert sent.status_code == 200
            assert sent.headers["content-type"].startswith("text/event-stream")
            events = _events(sent.text)
            texts = [data["text"] for name, data in events if name == "text"]
            assert "".join(texts) == "echo: Hello there"
            assert len(texts) > 1  # streamed delta by delta
            name, done = events[-1]
            assert name == "done"
            assert (done["seq"], done["status"], done["text"]) == (
                2,
                "complete",
                "echo: Hello there",
            )

            shown = await http.get(f"/conversations/{conversation_id}")
            assert shown.status_code == 200
            assert shown.json()["system"] == "Be brief."
            assert [(m["role"], m["text"]) for m in shown.json()["messages"]] == [
                ("user", "Hello there"),
                ("assistant", "echo: Hello there"),
            ]

            missing = await http.get("/conversations/conv_01JD8ZZZZZZZZZZZZZZZZZZZZZ")
            assert missing.status_code == 404
            assert missing.json()["error"] == "ConversationNotFound"
            empty = await http.post(f"/conversations/{conversation_id}/messages", json={})
            assert empty.status_code == 422

    asyncio.run(main())
    (request,) = [r for r in fake_api.requests if r.path == "/v1/messages"]
    assert request.body["stream"] is True


def test_a_busy_conversation_is_409_and_an_api_error_is_502(
    example: ModuleType, migrated_url: str, fake_api: FakeMessagesAPI
) -> None:
    app = _app(example, migrated_url, fake_api)
    fake_api.delay = 1.0

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://app") as http,
        ):
            conversation_id = (await http.post("/conversations", json={})).json()["id"]
            path = f"/conversations/{conversation_id}/messages"
            first = asyncio.create_task(http.post(path, json={"content": "one"}))
            await asyncio.sleep(0.3)
            second = await http.post(path, json={"content": "two"})
            assert second.status_code == 409
            assert second.json()["error"] == "ConversationBusy"
            assert (await first).status_code == 200
            fake_api.delay = 0.0
            fake_api.fail_next(400, error_type="invalid_request_error", message="bad request")
            refused = await http.post(path, json={"content": "three"})
            assert refused.status_code == 502

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def served(example: ModuleType, migrated_url: str, fake_api: FakeMessagesAPI) -> Iterator[str]:
    """The example app under uvicorn on 127.0.0.1, as it runs in production."""
    uvicorn = pytest.importorskip("uvicorn")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            _app(example, migrated_url, fake_api), host="127.0.0.1", port=port, log_level="error"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_a_client_that_disconnects_mid_reply_leaves_an_incomplete_turn(
    served: str, migrated_url: str, fake_api: FakeMessagesAPI
) -> None:
    fake_api.stream_event_delay = 0.05
    fake_api.stream_chunk_chars = 2
    with httpx.Client(base_url=served, timeout=20) as http:
        conversation_id = http.post("/conversations", json={}).json()["id"]
        path = f"/conversations/{conversation_id}/messages"
        with http.stream("POST", path, json={"content": "a long story about trams"}) as reply:
            lines = reply.iter_lines()
            first = [next(lines) for _ in range(2)]
            assert first[0] == "event: text"
        # The connection is closed after two events: the server stores what was sent.
        deadline = time.monotonic() + 20
        with ConversationStore(migrated_url) as store:
            while time.monotonic() < deadline:
                history = store.get(conversation_id).history()
                if len(history) == 2:
                    break
                time.sleep(0.05)
            assert [(m.role, m.status) for m in history] == [
                ("user", "complete"),
                ("assistant", "incomplete"),
            ]
        fake_api.stream_event_delay = 0.0
        again = http.post(path, json={"content": "go on"})
        assert again.status_code == 200  # the claim was released
        assert _events(again.text)[-1][1]["status"] == "complete"
