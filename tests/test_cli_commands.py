"""The conversation commands: new, send, list, show, rm, export, import, prune, verify, chat."""

from __future__ import annotations

import gzip
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
from tests.test_export import _corrupt_first_block


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
    assert out.splitlines()[0].split() == ["ID", "LAST", "ACTIVE", "(UTC)", "TURNS", "TITLE"]
    assert out.splitlines()[1].split()[-2:] == ["6", "Hello"]
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
    assert json.loads(run("show", conv_id, "--json", "--db", migrated_url)[1])["messages"] == []


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
    assert "exported 1 conversation, 7 messages" in out
    code, _, err = run("import", str(dump), "--db", migrated_url)
    assert code == 1
    assert "already exists" in err
    code, out, _ = run("import", str(dump), "--on-conflict", "new-id", "--db", migrated_url)
    assert out.strip() == "imported 1 conversation (7 messages); skipped 0"
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
    assert out.strip().splitlines()[-1] == "would delete 1 conversation (1 message)"
    assert out.startswith(old.id)
    assert len(json.loads(run("list", "--json", "--db", migrated_url)[1])) == 2
    code, _, err = run("prune", "--older-than", "30d", "--db", migrated_url)
    assert code == 2
    assert "Refusing without --yes" in err
    assert len(json.loads(run("list", "--json", "--db", migrated_url)[1])) == 2
    code, out, _ = run("prune", "--older-than", "30d", "--yes", "--db", migrated_url)
    assert out.strip().splitlines()[-1] == "deleted 1 conversation (1 message)"
    assert [c["id"] for c in json.loads(run("list", "--json", "--db", migrated_url)[1])] == [
        fresh.id
    ]
    code, _, err = run("prune", "--older-than", "soon", "--db", migrated_url)
    assert code == 2
    assert "not an age" in err
    code, _, err = run("prune", "--older-than", "6m", "--db", migrated_url)
    assert code == 2
    assert "6min for minutes or 6mo for months" in err


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
    assert "1 fault found" in err


def test_chat_commands_with_the_runner(
    migrated_url: str, api_env: dict[str, str], fake_api: FakeMessagesAPI
) -> None:
    script = (
        "hello\n/id\n/stats\n/context\n/compact\n/help\n"
        "/model claude-haiku-5-5\n/model\n/title Trip plans\n/system Be terse.\n/system\n"
        "/frobnicate\n"
        "line one \\\nline two\n"
        '"""\nblock one\n\nblock \x1b[Athree\n"""\n'
        "/exit\n"
    )
    code, out, err = run(
        "chat", "--system", "Be nice.", "--db", migrated_url, input=script, env=api_env
    )
    assert code == 0, err
    conv_id = out.split("New conversation ", 1)[1].split(".", 1)[0]
    assert "claude> echo: hello" in out
    assert f"\n{conv_id}\n" in out.replace("you> ", "\n")
    assert "1 request," in out
    assert "estimated input" in out
    assert "/model [NAME]" in out
    assert "claude-haiku-5-5\n" in out
    assert "Be terse.\n" in out
    assert "Unknown command /frobnicate; /help lists the commands." in err
    assert "claude> echo: line one \nline two" in out
    assert f"Continue with: convo chat {conv_id}" in out
    assert "\x1b[" not in out  # not a terminal: no colours
    # Two multi-line messages were two requests, escape codes stripped.
    sent = [r.body["messages"][-1]["content"] for r in fake_api.requests]
    assert [_text(c) for c in sent[-2:]] == ["line one \nline two", "block one\n\nblock three"]
    assert fake_api.requests[-1].body["model"] == "claude-haiku-5-5"
    with ConversationStore(migrated_url) as store:
        conv = store.get(conv_id)
        assert (conv.title, conv.system, conv.model) == (
            "Trip plans",
            "Be terse.",
            "claude-haiku-5-5",
        )
    code, out, _ = run("chat", conv_id[:-3], "--db", migrated_url, input="more\n", env=api_env)
    assert f"Continuing {conv_id} - Trip plans (6 turns, claude-haiku-5-5)" in out
    # The last four turns, shown before the prompt.
    resumed = out.split("/help for commands.\n", 1)[1].split("you> claude> echo: more", 1)[0]
    assert resumed.startswith("you> line one")
    assert resumed.count("claude> ") == 2
    code, out, _ = run("chat", "-c", "--db", migrated_url, input="/id\n", env=api_env)
    assert f"Continuing {conv_id}" in out


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    assert isinstance(content, list)
    return "".join(b["text"] for b in content if b.get("type") == "text")


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
    lines = target.read_text().splitlines()
    assert len(lines) == 5  # the conversation, 3 turns, the end record
    assert json.loads(lines[-1])["record"] == "end"


def test_export_is_whole_or_absent_and_skip_bad_reports(migrated_url: str, tmp_path: Path) -> None:
    db = ("--db", migrated_url)
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        ids = []
        for n in range(3):
            conv = store.create(title=f"c{n}")
            for i in range(6):
                conv.add("user" if i % 2 == 0 else "assistant", f"turn {i} of {n}")
            conv.compact()
            ids.append(conv.id)
    _corrupt_first_block(migrated_url, ids[1])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "backup.jsonl"
    code, out, err = run("export", "--all", "-o", str(target), *db)
    assert code == 1
    assert err.count("\n") == 1
    assert f"conversation {ids[1]} cannot be exported" in err
    assert "--skip-bad" in err
    assert list(out_dir.iterdir()) == []  # no file, not even a partial one
    code, out, err = run("export", "--all", "--skip-bad", "-o", str(target), *db)
    assert code == 0
    assert f"skipped {ids[1]}: archive block" in err
    assert "exported 2 conversations, 12 messages" in out
    assert "(1 skipped)" in out
    assert [p.name for p in out_dir.iterdir()] == ["backup.jsonl"]
    code, out, err = run("import", str(target), "--on-conflict", "new-id", *db)
    assert (code, out.strip()) == (0, "imported 2 conversations (12 messages); skipped 0")
    # A file cut short (a full disk, a killed copy) is refused whole.
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(target.read_text().splitlines(keepends=True)[:-1]))
    code, _, err = run("import", str(cut), "--on-conflict", "new-id", *db)
    assert code == 1
    assert "truncated" in err
    assert len(json.loads(run("list", "--json", *db)[1])) == 5


def test_export_to_a_missing_directory_is_one_line(migrated_url: str, tmp_path: Path) -> None:
    run("new", "--db", migrated_url)
    missing = tmp_path / "missing" / "dir" / "x.jsonl"
    code, _, err = run("export", "--all", "-o", str(missing), "--db", migrated_url)
    assert code == 1
    assert err.count("\n") == 1
    assert str(missing) in err
    assert "No such file or directory" in err
    assert "Traceback" not in err


def test_import_reads_stdin_gzip_and_refuses_what_is_not_an_export(
    migrated_url: str, tmp_path: Path
) -> None:
    db = ("--db", migrated_url)
    with ConversationStore(migrated_url) as store:
        store.create(title="from stdin").add("user", "héllo")
    dump = run("export", "--all", *db)[1]
    code, out, _ = run("import", "-", "--on-conflict", "new-id", *db, input=dump)
    assert (code, out.strip()) == (0, "imported 1 conversation (1 message); skipped 0")
    packed = tmp_path / "backup.jsonl.gz"
    packed.write_bytes(gzip.compress(dump.encode()))
    code, out, _ = run("import", str(packed), "--on-conflict", "new-id", *db)
    assert out.strip() == "imported 1 conversation (1 message); skipped 0"
    for name, data, problem in (
        ("empty.jsonl", b"", "is empty"),
        ("photo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),
        ("bom.jsonl", b"\xef\xbb\xbf" + dump.encode(), None),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        code, out, err = run("import", str(path), "--on-conflict", "new-id", *db)
        if problem is None:
            assert code == 0, err
            continue
        assert code == 1
        assert problem in err
        assert err.count("\n") == 1
    assert len(json.loads(run("list", "--json", *db)[1])) == 4
