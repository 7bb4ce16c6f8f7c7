"""The command line as a new user meets it: ids, -c, prompts, messages, colours, startup."""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import click
import pytest
from sqlalchemy import update

from convo import ConversationStore, ExtractiveSummarizer
from convo._cli import ENV_DATABASE_URL, cli
from convo._database import ENV_DATABASE_URL as LIBRARY_ENV_DATABASE_URL
from convo._docs import _walk
from convo._models import ConversationRow, utcnow
from convo._repl import LineReader, clean_input, load_history, read_message
from convo._schema import VERSION_TABLE
from tests import media
from tests.fakeapi import FakeMessagesAPI
from tests.test_cli_commands import api_env, run

__all__ = ["api_env"]  # the fixture, shared with the other command tests

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_database_command_takes_db_as_the_readme_says() -> None:
    assert "Every command that uses a database takes `--db URL`" in README
    without = []
    for path, context in _walk(cli, None, "convo"):
        if isinstance(context.command, click.Group):
            continue
        names = {o for p in context.command.params for o in getattr(p, "opts", [])}
        if "--db" not in names:
            without.append(path)
    assert without == ["convo db history"]
    assert "`convo db history` reads only" in README
    assert ENV_DATABASE_URL == LIBRARY_ENV_DATABASE_URL


def test_send_continue_model_system_and_prefixes(
    migrated_url: str, api_env: dict[str, str], fake_api: FakeMessagesAPI
) -> None:
    db = ("--db", migrated_url)
    code, _, err = run("send", "-c", "hello", *db, env=api_env)
    assert (code, "no conversation to continue" in err) == (2, True)
    older = run("new", "--title", "older", *db)[1].strip()
    newer = run("new", "--title", "newer", *db)[1].strip()
    code, out, _ = run("send", older[5:], "to the older one", *db, env=api_env)
    assert out == "echo: to the older one\n"
    # -c: the conversation with the latest activity, not the newest id.
    code, out, _ = run(
        "send", "-c", "again", "--model", "claude-haiku-5-5", "--system", "Terse.", *db, env=api_env
    )
    assert (code, out) == (0, "echo: again\n")
    body = fake_api.requests[-1].body
    assert body["model"] == "claude-haiku-5-5"
    assert "Terse." in json.dumps(body["system"])
    shown = json.loads(run("show", older[:-2], "--json", *db)[1])
    assert shown["conversation"]["id"] == older
    assert shown["conversation"]["model"] == "claude-haiku-5-5"
    assert len(shown["messages"]) == 4
    assert json.loads(run("show", newer, "--json", *db)[1])["messages"] == []
    shared = next(i for i, (a, b) in enumerate(zip(older, newer, strict=True)) if a != b)
    code, _, err = run("show", older[:shared], *db)
    assert code == 1
    assert "matches several conversations" in err
    assert older in err
    assert newer in err


def test_list_on_an_empty_database_says_so(migrated_url: str) -> None:
    code, out, _ = run("list", "--db", migrated_url)
    assert (code, out) == (0, "No conversations yet. Start one with `convo chat` or `convo new`.\n")
    assert "for user bob" in run("list", "--user", "bob", "--db", migrated_url)[1]


def test_list_reads_the_embedded_file_without_loading_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/list.db"
    with ConversationStore(url) as store:
        ada = store.create(title="ada's", user_id="ada", metadata={"plan": "pro", "n": [1, 2]})
        ada.extend([("user", "hi"), ("assistant", "hello")])
        store.create(title="bob's", user_id="bob", model="claude-haiku-5-5")
        ids = [c.id for c in store.list()]
    script = (
        "import sys; from convo._cli import cli; "
        "cli(['list', '--db', sys.argv[1], *sys.argv[2:]], standalone_mode=False); "
        "assert 'sqlalchemy' not in sys.modules, 'convo list loaded SQLAlchemy'"
    )

    def quick(*args: str) -> str:
        command = [sys.executable, "-c", script, url, *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    fast, fast_ada, fast_json = quick(), quick("--user", "ada"), quick("--json")
    assert [line.split()[0] for line in fast.splitlines()[1:]] == ids
    assert [line.split()[0] for line in fast_ada.splitlines()[1:]] == [ada.id]
    assert "No conversations for user eve yet" in quick("--user", "eve")
    # The store's answer, printed the same way.
    monkeypatch.setattr("convo._embedded.list_conversations", lambda *a, **k: None)
    assert run("list", "--db", url)[1] == fast
    assert run("list", "--db", url, "--user", "ada")[1] == fast_ada
    assert json.loads(run("list", "--db", url, "--json")[1]) == json.loads(fast_json)
    assert [c["model"] for c in json.loads(fast_json)] == ["claude-haiku-5-5", store.model]


def test_the_quick_list_leaves_anything_unusual_to_the_store(tmp_path: Path) -> None:
    from convo._embedded import list_conversations

    def listed(url: str | None) -> object:
        return list_conversations(url, user_id=None, limit=5)

    missing = tmp_path / "missing.db"
    assert listed(f"sqlite:///{missing}") is None
    assert not missing.exists()  # the store creates it, not the quick path
    assert listed("postgresql://postgres@127.0.0.1/test") is None
    assert listed("sqlite:///:memory:") is None
    url = f"sqlite:///{tmp_path}/c.db"
    with ConversationStore(url) as store:
        store.create(title="one")
    assert listed(f"{url}?timeout=5") is None  # options: only SQLAlchemy reads them right
    with_options = listed(url)
    assert isinstance(with_options, list)
    assert [c.title for c in with_options] == ["one"]
    with sqlite3.connect(tmp_path / "c.db") as con:
        con.execute(f"UPDATE {VERSION_TABLE} SET version_num = 'ffff'")
    assert listed(url) is None  # not this convo's schema: the store says what to do
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE notes (x)")
    assert listed(f"sqlite:///{other}") is None


def test_db_path_shows_the_embedded_file_or_the_url(isolated_environment: Path) -> None:
    code, out, _ = run("db", "path")
    assert code == 0
    assert out.strip() == str(isolated_environment / ".local/share/convo/convo.db")
    assert not Path(out.strip()).exists()  # only says where; creates nothing
    code, out, _ = run("db", "path", "--db", "postgresql://bob:hunter2@db.internal/app")
    assert out.strip() == "postgresql+psycopg://bob:***@db.internal/app"


def test_the_upgrade_hint_can_be_copied() -> None:
    from sqlalchemy import make_url

    from convo._migrations import out_of_date

    message = str(out_of_date(make_url("postgresql://bob:hunter2@db.internal/app"), None))
    assert "hunter2" not in message
    command = re.search(r"`(convo db upgrade [^`]*)`", message)
    assert command is not None
    assert shlex.split(command.group(1))[-1] == "postgresql://bob@db.internal/app"
    assert "(with your password)" in message


def test_alembic_as_the_readme_documents_it(database_url: str) -> None:
    match = re.search(r"`(alembic [^`]*upgrade head)`", README)
    assert match is not None
    args = match.group(1).replace("URL", database_url).split()
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_prune_lists_and_dry_runs(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        old = store.create(title="ancient")
        old.add("user", "hello")
        with store.database.transaction(write=True) as session:
            session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == old.id)
                .values(updated_at=utcnow() - timedelta(days=200))
            )
        store.create(title="recent")
    code, out, _ = run("prune", "--older-than", "6mo", "--dry-run", "--db", migrated_url)
    assert code == 0
    assert out.splitlines()[0].startswith(old.id)
    assert "ancient" in out
    assert out.splitlines()[-1] == "would delete 1 conversation (1 message)"
    code, out, _ = run("prune", "--older-than", "1y", "--db", migrated_url)
    assert out.strip() == "nothing to delete"
    code, out, _ = run("prune", "--older-than", "200min", "--yes", "--db", migrated_url)
    assert out.splitlines()[-1] == "deleted 1 conversation (1 message)"


def test_edit_delete_turn_and_regenerate_commands(
    migrated_url: str, api_env: dict[str, str], fake_api: FakeMessagesAPI
) -> None:
    db = ("--db", migrated_url)
    conv_id = run("new", *db)[1].strip()
    run("send", conv_id, "first", *db, env=api_env)
    run("send", conv_id, "second", *db, env=api_env)
    code, out, _ = run("edit", conv_id[5:-4], "3", "second, edited", *db)
    assert (code, out) == (0, "turn 3 (user) updated\n")
    code, out, _ = run("regenerate", "-c", *db, env=api_env)
    assert out == "echo: second, edited\n"
    code, _, err = run("delete-turn", conv_id, "4", *db)
    assert (code, "Refusing without --yes" in err) == (2, True)
    code, out, _ = run("delete-turn", conv_id, "4", "--yes", *db)
    assert out == f"deleted 1 turn (4-4) of {conv_id}\n"
    messages = json.loads(run("show", conv_id, "--json", *db)[1])["messages"]
    assert [m["content"][0]["text"] for m in messages] == ["first", "echo: first", "second, edited"]
    code, _, err = run("edit", conv_id, "9", "x", *db)
    assert (code, "there is no turn 9" in err) == (1, True)


def test_a_refused_connection_names_the_url(migrated_url: str) -> None:
    conv_id = run("new", "--db", migrated_url)[1].strip()
    env = {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    code, _, err = run("send", conv_id, "hi", "--db", migrated_url, env=env)
    assert code == 1
    assert "to http://127.0.0.1:9/v1/messages" in err
    assert "test-key" not in err


def test_warnings_are_formatted_once(migrated_url: str) -> None:
    with ConversationStore(migrated_url, summarizer=ExtractiveSummarizer()) as store:
        conv = store.create(token_budget=2_000)
        for i in range(40):
            conv.add("user" if i % 2 == 0 else "assistant", f"turn {i} " + "word " * 60)
        conv_id = conv.id
    # The window leaves turns out to fit and warns: one formatted line.
    code, _, err = run("show", conv_id, "--context", "--db", migrated_url)
    assert code == 0
    (line,) = err.splitlines()
    # How many turns are left out depends on the budget's split (recall's share too).
    assert re.fullmatch(
        f"convo: WARNING: conversation {conv_id}: turns 1-\\d+ left out of the request to fit "
        "the budget",
        line,
    )
    code, _, err = run("compact", conv_id, "--db", migrated_url)
    assert code == 1
    assert err.count("no Anthropic API key") == 1
    assert err.startswith("Error: ")


def test_import_convo_loads_neither_sqlalchemy_nor_the_sdk() -> None:
    script = (
        "import sys, convo, convo._cli\n"
        "print(sorted(m for m in ('anthropic', 'sqlalchemy', 'alembic', 'tiktoken')"
        " if m in sys.modules))\n"
        "convo.ConversationStore\n"
        "print('sqlalchemy' in sys.modules, 'anthropic' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == ["[]", "True False"]


def test_colours_only_on_a_terminal(migrated_url: str, api_env: dict[str, str]) -> None:
    code, out, _ = run("chat", "--db", migrated_url, input="hi\n", env=api_env)
    assert code == 0
    assert "\x1b[" not in out


def test_read_message_joins_continuations_and_blocks() -> None:
    def reader(lines: list[str]):  # type: ignore[no-untyped-def]
        feed = iter(lines)

        def read(_prompt: str) -> str:
            try:
                return next(feed)
            except StopIteration:
                raise EOFError from None

        return read

    assert read_message(reader(["a \\", "b\\", "c", "d"]), "> ", ". ") == "a \nb\nc"
    assert read_message(reader(['"""', "x", "", "y", '"""', "z"]), "> ", ". ") == "x\n\ny"
    assert read_message(reader(['"""', "cut off"]), "> ", ". ") == "cut off"
    assert read_message(reader(["keep \\\\"]), "> ", ". ") == "keep \\\\"
    assert clean_input("up\x1b[Aarrow\x1b[1;5Dx\x07\ttab") == "uparrowx\ttab"


@pytest.mark.slow
def test_arrow_up_recalls_the_last_input_on_a_terminal(
    migrated_url: str, api_env: dict[str, str], fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    import pty
    import select
    import time

    env = {**os.environ, **api_env, "TERM": "xterm", "PYTHONUNBUFFERED": "1"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: convo chat on the terminal
        os.execve(
            sys.executable, [sys.executable, "-m", "convo", "chat", "--db", migrated_url], env
        )
    seen = b""

    def wait_for(text: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert text in seen, seen.decode(errors="replace")

    try:
        wait_for(b"/help for commands.")
        os.write(fd, b"hello there\r")
        wait_for(b"echo: hello there")
        os.write(fd, b"\x1b[A\r")  # up-arrow, Enter: the same line again
        deadline = time.monotonic() + 60
        while len(fake_api.requests) < 2 and time.monotonic() < deadline:
            wait_for(b"you>", 5)
        # A bracketed paste of three lines, then Enter: one message, one request.
        os.write(fd, b"\x1b[200~one\ntwo\nthree\x1b[201~\r")
        deadline = time.monotonic() + 60
        while len(fake_api.requests) < 3 and time.monotonic() < deadline:
            wait_for(b"you>", 5)
        os.write(fd, b"/exit\r")
        wait_for(b"Bye.")
    finally:
        os.close(fd)
        os.waitpid(pid, 0)
    texts = [r.body["messages"][-1]["content"] for r in fake_api.requests]
    flat = [t if isinstance(t, str) else t[-1]["text"] for t in texts]
    assert flat[1] == "hello there"
    assert flat[2] == "one\ntwo\nthree"
    assert len(fake_api.requests) == 3
    history = Path(env["HOME"]) / ".local/share/convo/chat_history"
    assert "hello there" in history.read_text()


def test_search_command_filters(migrated_url: str) -> None:
    with ConversationStore(migrated_url) as store:
        conv = store.create()
        conv.add("user", "what is the refund policy")
        conv.add("assistant", "refunds within thirty days, policy says")
    db = ("--db", migrated_url)
    code, out, _ = run("search", '"refund policy"', *db)
    assert (code, [line.split()[1] for line in out.splitlines()]) == (0, ["#1"])
    code, out, _ = run("search", "refun*", "--role", "assistant", *db)
    assert [line.split()[1] for line in out.splitlines()] == ["#2"]
    code, out, err = run("search", "refund", "--until", "2000-01-01", *db)
    assert (out, err) == ("", "no matches\n")
    code, out, _ = run(
        "search", "policy", "--conversation", conv.id[:-3], "--since", "2000-01-01", *db
    )
    assert len(out.splitlines()) == 2


def test_the_fast_schema_check_agrees_with_alembic(migrated_url: str) -> None:
    from convo import _migrations
    from convo._database import Database, resolve_url
    from convo._schema import shipped_head, stored_revision

    assert shipped_head() == _migrations.head_revision()
    database = Database(resolve_url(migrated_url))
    try:
        with database.transaction() as session:
            assert stored_revision(session.connection()) == _migrations.head_revision()
        _migrations.downgrade(database, "base")
        with database.transaction() as session:
            assert stored_revision(session.connection()) is None
    finally:
        database.close()


def test_version_names_the_distribution() -> None:
    from importlib.metadata import version

    code, out, _ = run("--version")
    assert (code, out) == (0, f"convo, version {version('convo-store')}\n")


def test_send_attaches_images_and_text_files(
    migrated_url: str, api_env: dict[str, str], fake_api: FakeMessagesAPI, tmp_path: Path
) -> None:
    import base64

    png = tmp_path / "dot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 32)
    notes = tmp_path / "notes.md"
    notes.write_text("\ufeff# Notes\nbuy milk\n", encoding="utf-8")
    db = ("--db", migrated_url)
    conv_id = run("new", *db)[1].strip()
    code, _, err = run(
        "send",
        conv_id,
        "what are these?",
        "--file",
        str(png),
        "--file",
        str(notes),
        *db,
        env=api_env,
    )
    assert code == 0, err
    content = fake_api.requests[-1].body["messages"][-1]["content"]
    assert [b["type"] for b in content] == ["image", "document", "text"]
    assert content[0]["source"]["media_type"] == "image/png"
    assert base64.b64decode(content[0]["source"]["data"]) == png.read_bytes()
    assert content[1]["source"] == {
        "type": "text",
        "media_type": "text/plain",
        "data": "# Notes\nbuy milk\n",
    }
    assert content[1]["title"] == "notes.md"
    # A file alone is a message too; bad files are refused before anything is stored.
    assert run("send", conv_id, "--file", str(notes), *db, env=api_env)[0] == 0
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(media.pdf(2, "Quarterly figures"))
    assert run("send", conv_id, "sum it up", "--file", str(pdf), *db, env=api_env)[0] == 0
    document = fake_api.requests[-1].body["messages"][-1]["content"][0]
    assert document["type"] == "document"
    assert document["title"] == "report.pdf"
    assert document["source"]["media_type"] == "application/pdf"
    assert base64.b64decode(document["source"]["data"]) == pdf.read_bytes()
    huge, blob = tmp_path / "huge.pdf", tmp_path / "a.bin"
    huge.write_bytes(b"%PDF-1.7\n" + b"0" * (32 * 1024 * 1024))
    blob.write_bytes(b"\xff\xfe\x00\x81" * 10)
    missing = tmp_path / "missing.txt"
    cases = ((huge, "at most 32 MB"), (blob, "neither an image"), (missing, "cannot read"))
    for path, reason in cases:
        code, _, err = run("send", conv_id, "x", "--file", str(path), *db, env=api_env)
        assert (code, err.startswith("Error: file: "), reason in err) == (1, True, True), err
    assert json.loads(run("show", conv_id, "--json", *db)[1])["conversation"]["messages"] == 6


def test_a_message_of_several_lines_is_one_history_entry(tmp_path: Path) -> None:
    """Up-arrow brings a multi-line message back whole, in this chat and the next."""
    readline = pytest.importorskip("readline")
    readline.clear_history()
    try:
        reader = LineReader(interactive=True)
        reader.path = tmp_path / "chat_history"
        reader.begin()
        for line in ("first line\\", "second line"):  # what input() adds, line by line
            readline.add_history(line)
        reader.remember("first line\nsecond line")
        reader.begin()
        readline.add_history("short one")
        reader.remember("short one")
        expected = ["first line\nsecond line", "short one"]
        count = readline.get_current_history_length()
        assert [readline.get_history_item(i) for i in range(1, count + 1)] == expected
        assert load_history(reader.path) == expected
        # An older history file, in readline's own format, still loads.
        older = tmp_path / "older"
        older.write_text("one\ntwo\n")
        assert load_history(older) == ["one", "two"]
        assert load_history(tmp_path / "none") == []
    finally:
        readline.clear_history()
