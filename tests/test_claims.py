"""Send claims: renewed while the call lives, short for a dead sender, clearable by hand;
the CLI keeps a partial reply on SIGTERM/SIGHUP; a SIGKILLed sender blocks one lease."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import anthropic
import pytest
from click.testing import CliRunner

from convo import APIError, ConversationBusy, InvalidInput, SendTimedOut, StreamInterrupted
from convo._cli import cli
from convo._store import DEFAULT_SEND_LEASE
from tests.faces import ConversationStore
from tests.fakeapi import FakeMessagesAPI, Reply

pytestmark = pytest.mark.faces


@pytest.fixture
def store(migrated_url: str, api_client: anthropic.Anthropic) -> Iterator[ConversationStore]:
    with ConversationStore(migrated_url, client=api_client) as opened:
        yield opened


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_a_long_call_keeps_its_claim_past_the_lease(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    assert DEFAULT_SEND_LEASE <= 60  # a dead sender blocks about a minute at most
    with ConversationStore(migrated_url, client=api_client, send_lease=1.0) as store:
        conv = store.create()
        fake_api.delay = 3.5  # more than three leases
        done: list[str] = []
        sender = threading.Thread(target=lambda: done.append(conv.send("slow one").text))
        sender.start()
        time.sleep(2.5)  # the first claim would have lapsed twice over
        with pytest.raises(ConversationBusy):
            store.get(conv.id).send("sneaking in")
        sender.join()
        assert done == ["echo: slow one"]
        assert [m.role for m in conv.history()] == ["user", "assistant"]
        fake_api.delay = 0
        conv.send("after")  # released at the end


def test_busy_says_when_the_claim_expires_and_how_to_clear_it(store: ConversationStore) -> None:
    conv = store.create()
    store.records.claim_and_append(conv.id, store.turns.make_turn("user", "a sender that died"))
    with pytest.raises(ConversationBusy) as caught:
        conv.send("hello")
    message = str(caught.value)
    assert "expires at" in message
    assert f"convo unlock {conv.id}" in message
    assert "release_claim(force=True)" in message
    assert isinstance(caught.value.until, datetime)
    assert 0 < (caught.value.until - conv.created_at).total_seconds() <= DEFAULT_SEND_LEASE + 5
    with pytest.raises(InvalidInput, match="force=True"):
        conv.release_claim()
    assert conv.release_claim(force=True) is True
    assert conv.release_claim(force=True) is False
    assert conv.send("now").text.startswith("echo: ")


def test_convo_unlock(store: ConversationStore) -> None:
    conv = store.create()
    store.records.claim_and_append(conv.id, store.turns.make_turn("user", "a sender that died"))
    code, out, _ = _cli("unlock", conv.id, "--db", _url(store))
    assert (code, out.strip()) == (0, f"released the send claim on {conv.id}")
    code, out, _ = _cli("unlock", conv.id, "--db", _url(store))
    assert (code, out.strip()) == (0, f"{conv.id} had no send claim")
    assert conv.send("works").seq == 3


def _url(store: ConversationStore) -> str:
    return store.database.url.render_as_string(hide_password=False)


def test_send_timeout_cuts_a_slow_stream_and_keeps_what_arrived(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    fake_api.queue_reply(Reply(text="slowly " * 200))
    fake_api.stream_event_delay = 0.02
    with ConversationStore(migrated_url, client=api_client, send_timeout=0.5) as store:
        conv = store.create()
        started = time.monotonic()
        with pytest.raises(StreamInterrupted, match="send_timeout"), conv.stream("go") as reply:
            list(reply)
        assert time.monotonic() - started < 3.0
        last = conv.history()[-1]
        assert (last.role, last.status) == ("assistant", "incomplete")
        assert last.text.startswith("slowly")
        assert store.records.release(conv.id) is False
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InvalidInput, match="send_timeout"):
            ConversationStore(migrated_url, send_timeout=bad)
        with pytest.raises(InvalidInput, match="send_lease"):
            ConversationStore(migrated_url, send_lease=bad)


def test_send_timeout_bounds_a_call_and_its_retries(
    migrated_url: str, api_client: anthropic.Anthropic, fake_api: FakeMessagesAPI
) -> None:
    """A non-streamed call that hangs, and a retry the server asks to wait for:
    each ends at the deadline, not after the SDK's retries (two, here)."""
    with ConversationStore(migrated_url, client=api_client, send_timeout=1.0) as store:
        conv = store.create()
        fake_api.delay = 3.0  # every attempt outlasts the deadline
        started = time.monotonic()
        with pytest.raises(SendTimedOut, match=r"send_timeout \(1 s\) reached"):
            conv.send("a slow one", max_tokens=100)
        assert time.monotonic() - started < 2.0
        fake_api.delay = 0.0
        fake_api.fail_next(529, retry_after=30)
        started = time.monotonic()
        with pytest.raises(SendTimedOut, match="HTTP 529 and the SDK would retry only after 30"):
            conv.send("overloaded", max_tokens=100)
        assert time.monotonic() - started < 1.0
        assert [(m.role, m.status) for m in conv.history()] == [
            ("user", "failed"),
            ("user", "failed"),
        ]
        assert store.records.release(conv.id) is False  # no claim left behind
        # What is not retried stays the API's own error; a quick retry still happens.
        fake_api.fail_next(400, message="bad things")
        with pytest.raises(APIError, match="bad things") as caught:
            conv.send("refused", max_tokens=100)
        assert not isinstance(caught.value, SendTimedOut)
        fake_api.fail_next(529, retry_after=0.001)
        reply = conv.send("and now", max_tokens=100)
        assert reply.text.startswith("echo: ")
        assert fake_api.requests[-1].body["messages"][0]["content"][0]["text"] == "a slow one"


def _slow_env(fake_api: FakeMessagesAPI) -> dict[str, str]:
    return {
        **os.environ,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": fake_api.base_url,
        "PYTHONUNBUFFERED": "1",
    }


def _slow_sender(
    url: str, fake_api: FakeMessagesAPI, *argv: str
) -> tuple[str, subprocess.Popen[str]]:
    """A new conversation and a process (``argv`` + its id + ``url``) streaming a slow reply."""
    with ConversationStore(url) as store:
        conv_id = store.create().id
    fake_api.queue_reply(Reply(text="once upon a time " * 300))
    fake_api.stream_event_delay = 0.02
    process = subprocess.Popen(
        [sys.executable, *argv, conv_id, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_slow_env(fake_api),
    )
    return conv_id, process


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float = 30) -> str:
    assert process.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        char = process.stdout.read(1)
        if not char:
            break
        seen += char
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_convo_send_killed_by_sigterm_or_sighup_keeps_the_partial_reply(
    migrated_url: str, fake_api: FakeMessagesAPI, signum: int
) -> None:
    conv_id, process = _slow_sender(
        migrated_url, fake_api, "-m", "convo", "send", "--db", migrated_url, "--"
    )
    seen = _read_until(process, "once upon")
    time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert f"Terminated by {signal.Signals(signum).name}" in err
    assert "Traceback" not in err
    with ConversationStore(migrated_url) as store:
        history = store.get(conv_id).history()
        assert [(m.role, m.status) for m in history] == [
            ("user", "complete"),
            ("assistant", "incomplete"),
        ]
        assert seen.startswith("once upon")
        assert history[1].text.startswith("once upon a time")
        assert len(history[1].text) < len("once upon a time " * 300)
        assert store.records.release(conv_id) is False  # the claim was released on the way out


SENDER = textwrap.dedent(
    """
    import sys
    from convo import ConversationStore

    conv_id, url = sys.argv[1], sys.argv[2]
    with ConversationStore(url, send_lease=1.5) as store:
        with store.get(conv_id).stream("tell me a story") as reply:
            for delta in reply:
                print(delta, end="", flush=True)
    """
)


@pytest.mark.slow
def test_a_sigkilled_sender_blocks_for_one_lease_only(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    conv_id, process = _slow_sender(migrated_url, fake_api, "-c", SENDER)
    _read_until(process, "once upon")
    time.sleep(2.0)  # past one lease: the heartbeat has renewed the claim meanwhile
    with ConversationStore(migrated_url, client=api_client) as store:
        with pytest.raises(ConversationBusy):
            store.get(conv_id).send("still streaming?")
        process.kill()
        process.communicate(timeout=30)
        killed_at = time.monotonic()
        reply = None
        while reply is None and time.monotonic() - killed_at < 10:
            try:
                reply = store.get(conv_id).send("are you there?")
            except ConversationBusy:
                time.sleep(0.1)
        waited = time.monotonic() - killed_at
        assert reply is not None
        assert waited <= 1.5 + 1.0
        roles = [m.role for m in store.get(conv_id).history()]
        assert roles == ["user", "user", "assistant"]


REGENERATOR = textwrap.dedent(
    """
    import sys
    from convo import ConversationStore

    conv_id, url = sys.argv[1], sys.argv[2]
    with ConversationStore(url, send_lease=1.5) as store:
        with store.get(conv_id).regenerate_stream() as reply:
            for delta in reply:
                print(delta, end="", flush=True)
    """
)


def test_a_regeneration_killed_mid_call_keeps_the_old_reply(
    migrated_url: str, fake_api: FakeMessagesAPI, api_client: anthropic.Anthropic
) -> None:
    """SIGKILL while the new reply streams: nothing ran to clean up, and the old
    reply is still the answer; the claim lapses within one lease."""
    with ConversationStore(migrated_url) as store:
        conv = store.create()
        conv.extend([("user", "the question"), ("assistant", "the old answer")])
    fake_api.queue_reply(Reply(text="once upon a time " * 300))
    fake_api.stream_event_delay = 0.02
    process = subprocess.Popen(
        [sys.executable, "-c", REGENERATOR, conv.id, migrated_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_slow_env(fake_api),
    )
    assert _read_until(process, "once upon").endswith("once upon")
    process.kill()
    process.communicate(timeout=30)
    fake_api.stream_event_delay = 0.0
    conv_id = conv.id
    with ConversationStore(migrated_url, client=api_client) as store:
        assert [(m.role, m.text) for m in store.get(conv_id).history()] == [
            ("user", "the question"),
            ("assistant", "the old answer"),
        ]
        reply = None
        killed_at = time.monotonic()
        while reply is None and time.monotonic() - killed_at < 10:
            try:
                reply = store.get(conv_id).regenerate(max_tokens=100)
            except ConversationBusy:
                time.sleep(0.1)
        assert reply is not None
        assert time.monotonic() - killed_at <= 1.5 + 1.0  # one lease, and a margin
        assert [(m.role, m.text) for m in store.get(conv_id).history()] == [
            ("user", "the question"),
            ("assistant", reply.text),
        ]
