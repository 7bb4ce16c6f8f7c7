"""The conversation commands: new, send, list, show, rm, export, import, prune, verify, chat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from convo import ConversationStore, ExtractiveSummarizer
from convo._cli import cli
from convo._models import ArchiveBlockRow, ConversationRow, utcnow
from tests.fakeapi import FakeMessagesAPI, Reply


def run(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def api_env(fake_api: FakeMessagesAPI) -> dict[str, str]:
    return {"ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake_api.base_url}


def test_new_send_list_show_rm(migrated_url: str, api_env: dict[str, str]) -> None:
    db = ("--db", migrated_url)
    code, out, _ = run("new", "--title", "Hello", "--user", "ada", "--budget", "5000", *db)
    assert code == 0
    conv_id = out.strip()
    assert conv_id.startswith("conv_")
    code, out, _ = run("send", conv_id, "Hi there", *db, env=api_env)
    assert (code, out) == (0, "echo: Hi there\n")
    code, out, _ = run("send", conv_id, "-", *db, input="from stdin\n", env=api_env)
    assert out == "echo: from stdin\n"
    code, out, _ = run("send", conv_id, "as json", "--json", *db, env=api_env)
    assert json.loads(out)["seq"] == 6
    code, out, _ = run("list", "--user", "ada", *db)
    assert conv_id in out
    assert "6 turns" in out
    assert "Hello" in out
    listed = json.loads(run("list", "--json", *db)[1])
    assert [c["id"] for c in listed] == [conv_id]
    code, out, _ = run("rm", conv_id, *db)
    assert out.strip() == f"deleted {conv_id}"
    assert run("list", "--json", *db)[1].strip() == "[]"
    code, _, err = run("rm", conv_id, *db)
    assert code == 1
    assert "conversation not found" in err


def test_send_without_an_api_key(migrated_url: str) -> None:
    conv_id = run("new", "--db", migrated_url)[1].strip()
    code, _, err = run("send", conv_id, "hello", "--db", migrated_url)
    assert code == 1
    assert "set ANTHROPIC_API_KEY" in err
    assert "Traceback" not in err
    assert run("show", conv_id, "--json", "--db", migrated_url)[1].strip() == "[]"


def test_send_empty_text_is_a_usage_error(migrated_url: str) -> None:
    conv_id = run("new", "--db", migrated_url)[1].strip()
    code, _, err = run("send", conv_id, "-", "--db", migrated_url, input="   \n")
    assert code == 2
    assert "nothing to send" in err


def test_export_then_import_through_the_cli(migrated_url: str, tmp_path: Path) -> None:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.create(title="Backup me")
        for i in range(6):
            conv.add("user" if i % 2 == 0 else "assistant", f"turn {i}")
        conv.add("user", "last")
        conv.compact()
    dump = tmp_path / "backup.jsonl"
    code, out, _ = run("export", "--all", "-o", str(dump), "--db", migrated_url)
    assert code == 0
    assert "exported 1 conversations, 7 messages" in out
    code, _, err = run("import", str(dump), "--db", migrated_url)
    assert code == 1
    assert "already exists" in err
    code, out, _ = run("import", str(dump), "--on-conflict", "new-id", "--db", migrated_url)
    assert out.strip() == "imported 1 conversations (7 messages); skipped 0"
    code, out, _ = run("export", conv.id, "--format", "markdown", "--db", migrated_url)
    assert out.startswith("# Backup me")
    code, _, err = run("export", "--db", migrated_url)
    assert code == 2
    assert "say what to export" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(dump.read_text().replace('"seq":3', '"seq":9'))
    code, _, err = run("import", str(bad), "--on-conflict", "new-id", "--db", migrated_url)
    assert code == 1
    assert "line 4: seq must be 3" in err
    assert len(json.loads(run("list", "--json", "--db", migrated_url)[1])) == 2


def test_export_import_in_real_subprocesses(tmp_path: Path) -> None:
    source, target = tmp_path / "a.db", tmp_path / "b.db"
    with ConversationStore(f"sqlite:///{source}") as store:
        conv = store.create(title="Ünïcode ✓")
        conv.add("user", "héllo 🌍")
    env = {**os.environ}

    def convo(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "convo", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        )
        return done.stdout

    dumped = convo("export", "--all", "--db", f"sqlite:///{source}")
    assert json.loads(dumped.splitlines()[1])["content"][0]["text"] == "héllo 🌍"
    path = tmp_path / "dump.jsonl"
    path.write_text(dumped, encoding="utf-8")
    convo("import", str(path), "--db", f"sqlite:///{target}")
    assert convo("export", "--all", "--db", f"sqlite:///{target}") == dumped


def test_prune_deletes_only_stale_conversations(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        old, fresh = store.create(title="old"), store.create(title="fresh")
        old.add("user", "long ago")
        with store.database.transaction(write=True) as session:
            session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == old.id)
                .values(updated_at=utcnow() - timedelta(days=40))
            )
    code, out, _ = run("prune", "--older-than", "30d", "--dry-run", "--db", migrated_url)
    assert out.strip() == "would delete 1 conversations (1 messages)"
    assert len(json.loads(run("list", "--json", "--db", migrated_url)[1])) == 2
    code, out, _ = run("prune", "--older-than", "30d", "--db", migrated_url)
    assert out.strip() == "deleted 1 conversations (1 messages)"
    assert [c["id"] for c in json.loads(run("list", "--json", "--db", migrated_url)[1])] == [
        fresh.id
    ]
    code, _, err = run("prune", "--older-than", "soon", "--db", migrated_url)
    assert code == 2
    assert "not a duration" in err


def test_verify_finds_a_corrupted_block(migrated_url: str) -> None:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.create()
        for i in range(5):
            conv.add("user" if i % 2 == 0 else "assistant", f"turn {i}")
        conv.compact()
        code, out, _ = run("verify", "--db", migrated_url)
        assert (code, "all conversations verified" in out) == (0, True)
        with store.database.transaction(write=True) as session:
            session.execute(update(ArchiveBlockRow).values(checksum="0" * 64))
    code, _, err = run("verify", "--db", migrated_url)
    assert code == 1
    assert "checksum mismatch" in err
    assert "1 faults found" in err


def test_chat_commands_with_the_runner(migrated_url: str, api_env: dict[str, str]) -> None:
    script = "hello\n/id\n/stats\n/context\n/compact\n/help\nsecond\n/exit\n"
    code, out, err = run(
        "chat",
        "--system",
        "Be nice.",
        "--db",
        migrated_url,
        input=script,
        env={**api_env, "NO_COLOR": "1"},
    )
    assert code == 0, err
    conv_id = out.split("New conversation ", 1)[1].split(".", 1)[0]
    assert "claude> echo: hello" in out
    assert f"\n{conv_id}\n" in out.replace("you> ", "\n")
    assert "1 requests" in out
    assert "estimated input" in out
    assert "Commands: /id" in out
    assert "claude> echo: second" in out
    assert f"Continue with: convo chat {conv_id}" in out
    assert "\x1b[" not in out  # NO_COLOR
    code, out, _ = run("chat", conv_id, "--db", migrated_url, input="more\n", env=api_env)
    assert f"Continuing {conv_id} (" in out


def test_chat_without_an_api_key_says_what_to_set(migrated_url: str) -> None:
    code, _, err = run("chat", "--db", migrated_url, input="hi\n")
    assert code == 1
    assert err.strip() == (
        "Error: no Anthropic API key: set ANTHROPIC_API_KEY (or pass client= to ConversationStore)"
    )


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_not_the_chat(
    migrated_url: str, fake_api: FakeMessagesAPI, api_env: dict[str, str]
) -> None:
    fake_api.queue_reply(Reply(text="once upon a time " * 200))
    fake_api.stream_event_delay = 0.02
    process = subprocess.Popen(
        [sys.executable, "-m", "convo", "chat", "--db", migrated_url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **api_env, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdin is not None
    assert process.stdout is not None
    process.stdin.write("tell me a story\n")
    process.stdin.flush()
    seen = ""
    deadline = time.monotonic() + 30
    while "once upon" not in seen and time.monotonic() < deadline:
        seen += process.stdout.read(1)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.stdin.write("/exit\n")
    process.stdin.flush()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "[stopped; the text so far is kept]" in seen + out
    conv_id = (seen + out).split("New conversation ", 1)[1].split(".", 1)[0]
    with ConversationStore(migrated_url) as store:
        history = store.get(conv_id).history()
    assert [(m.role, m.status) for m in history] == [
        ("user", "complete"),
        ("assistant", "incomplete"),
    ]
    assert history[1].text.startswith("once upon a time")
    assert len(history[1].text) < len("once upon a time " * 200)


def test_export_shows_progress_on_a_terminal_only(migrated_url: str, tmp_path: Path) -> None:
    with ConversationStore(migrated_url) as store:
        conv = store.create()
        for i in range(3):
            conv.add("user", f"turn {i}")
        assert store.message_total() == 3
        assert store.message_total(user_id="nobody") == 0
    target = tmp_path / "out.jsonl"
    code, _, err = run("export", "--all", "-o", str(target), "--db", migrated_url)
    assert code == 0
    assert err == ""  # not a terminal: no progress bar
    assert len(target.read_text().splitlines()) == 4
