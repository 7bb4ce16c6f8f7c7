"""A small chat API on convo's async store: FastAPI, replies streamed as server-sent events.

Run it (with ``pip install 'convo-store[async,examples]'`` and ANTHROPIC_API_KEY set)::

    uvicorn examples.fastapi_app:app

    curl -s -X POST localhost:8000/conversations -H 'content-type: application/json' \\
         -d '{"system": "You are terse."}'
    curl -N -X POST localhost:8000/conversations/<id>/messages \\
         -H 'content-type: application/json' -d '{"content": "Hello!"}'
    curl -s localhost:8000/conversations/<id>

Every turn is stored before the call and the reply when it ends, so a client
that disconnects mid-reply leaves the text it got as an ``incomplete`` turn,
and the conversation is free for the next message at once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from convo import (
    APIError,
    AsyncConversationStore,
    ConversationBusy,
    ConversationNotFound,
    ConvoError,
    InvalidInput,
    Message,
    StreamInterrupted,
)


class NewConversation(BaseModel):
    system: str | None = None
    title: str | None = None
    user_id: str | None = None


class NewMessage(BaseModel):
    content: str = Field(min_length=1)
    max_tokens: int = Field(default=1024, ge=1, le=64_000)


def _message(message: Message) -> dict[str, Any]:
    return {
        "seq": message.seq,
        "role": message.role,
        "text": message.text,
        "status": message.status,
        "created_at": message.created_at.isoformat(),
        "usage": message.usage,
    }


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


#: convo's errors as HTTP statuses; anything else of convo's is a 500.
STATUS = {ConversationNotFound: 404, ConversationBusy: 409, InvalidInput: 422, APIError: 502}


def create_app(
    open_store: Callable[[], AsyncConversationStore] = AsyncConversationStore,
) -> FastAPI:
    """The app; ``open_store`` makes its store (default: from the environment)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_store() as store:
            app.state.store = store
            yield

    app = FastAPI(title="convo chat", lifespan=lifespan)

    @app.exception_handler(ConvoError)
    async def convo_error(_request: Request, exc: ConvoError) -> JSONResponse:
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status)

    def store_of(request: Request) -> AsyncConversationStore:
        store: AsyncConversationStore = request.app.state.store
        return store

    @app.post("/conversations", status_code=201)
    async def create_conversation(body: NewConversation, request: Request) -> dict[str, Any]:
        conv = await store_of(request).create(
            system=body.system, title=body.title, user_id=body.user_id
        )
        return {"id": conv.id, "title": conv.title, "created_at": conv.created_at.isoformat()}

    @app.post("/conversations/{conversation_id}/messages")
    async def send_message(
        conversation_id: str, body: NewMessage, request: Request
    ) -> StreamingResponse:
        conv = await store_of(request).get(conversation_id)
        # Enter the stream before answering, so a busy conversation or a refused
        # call is an HTTP error, not a broken 200.
        stack = AsyncExitStack()
        reply = await stack.enter_async_context(
            conv.stream(body.content, max_tokens=body.max_tokens)
        )

        async def events() -> AsyncIterator[str]:
            try:
                async with stack:  # leaving it stores the reply (incomplete if cut short)
                    async for text in reply:
                        yield _event("text", {"text": text})
            except StreamInterrupted as exc:
                yield _event("error", {"error": "StreamInterrupted", "detail": str(exc)})
            if reply.message is not None:
                yield _event("done", _message(reply.message))

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request) -> dict[str, Any]:
        conv = await store_of(request).get(conversation_id)
        return {
            "id": conv.id,
            "title": conv.title,
            "system": conv.system,
            "user_id": conv.user_id,
            "messages": [_message(m) async for m in conv.iter_history()],
        }

    return app


app = create_app()
