"""The ``convo`` command line: the db commands, errors without tracebacks, docs that match."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect

from convo import ConversationStore, _migrations
from convo._cli import cli
from convo._database import resolve_url
from convo._docs import cli_reference, commands

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_db_upgrade_current_check_history(database_url: str) -> None:
    head = _migrations.head_revision()
    code, out, _ = run("db", "current", "--db", database_url)
    assert (code, "none" in out) == (0, True)
    code, _, err = run("db", "check", "--db", database_url)
    assert code == 1
    assert "convo db upgrade" in err
    code, out, _ = run("db", "upgrade", "--db", database_url)
    assert code == 0
    assert f"at revision {head}" in out
    assert run("db", "current", "--db", database_url)[1].strip() == f"{head} (head)"
    code, out, _ = run("db", "check", "--db", database_url)
    assert (code, "matches" in out) == (0, True)
    code, out, _ = run("db", "history")
    assert head in out
    with ConversationStore(database_url) as store:
        store.create()


def test_db_downgrade_to_base_and_back(database_url: str) -> None:
    assert run("db", "upgrade", "--db", database_url)[0] == 0
    code, _, err = run("db", "downgrade", "base", "--db", database_url)
    assert code == 2
    assert "Refusing without --yes" in err
    assert run("db", "current", "--db", database_url)[1].strip().endswith("(head)")
    code, out, _ = run("db", "downgrade", "base", "--yes", "--db", database_url)
    assert (code, out.strip().endswith("base")) == (0, True)
    engine = create_engine(resolve_url(database_url))
    try:
        assert [t for t in inspect(engine).get_table_names() if t.startswith("convo_")] == []
    finally:
        engine.dispose()
    assert run("db", "current", "--db", database_url)[1].startswith("none")
    assert run("db", "upgrade", "--db", database_url)[0] == 0


def test_db_uses_the_environment_variable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    code, out, _ = run("db", "upgrade", env={"CONVO_DATABASE_URL": url})
    assert code == 0
    assert str(tmp_path / "env.db") in out


def test_db_upgrade_to_an_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    code, out, err = run("db", "upgrade", "nonsense", "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 1
    assert err.startswith("Error: revision: ")
    assert "nonsense" in err
    assert "Traceback" not in err + out


def test_unreachable_database_error_masks_password() -> None:
    code, out, err = run("db", "current", "--db", "postgresql://bob:hunter2@127.0.0.1:1/x")
    assert code == 1
    assert "hunter2" not in out + err
    assert "bob:***@127.0.0.1:1/x" in err
    assert "Traceback" not in err


def test_not_a_convo_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "text.db"
    path.write_text("hello")
    code, _, err = run("db", "upgrade", "--db", f"sqlite:///{path}")
    assert code == 1
    assert "not a SQLite database" in err
    assert path.read_text() == "hello"


def test_real_subprocess_reports_errors_on_stderr(tmp_path: Path) -> None:
    env = {**os.environ, "CONVO_DATABASE_URL": "postgresql://u:topsecret@127.0.0.1:1/x"}
    done = subprocess.run(
        [sys.executable, "-m", "convo", "db", "current"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("Error: cannot use the database at ")
    assert "topsecret" not in done.stderr
    assert "Traceback" not in done.stderr


def test_usage_errors_exit_2() -> None:
    code, _, err = run("db", "downgrade")
    assert code == 2
    assert "Missing argument 'REVISION'" in err


def test_cli_reference_is_up_to_date() -> None:
    on_disk = (ROOT / "docs" / "cli.md").read_text()
    assert on_disk == cli_reference(), "run scripts/docs to regenerate docs/cli.md"


@pytest.mark.parametrize("command", commands())
def test_every_command_is_in_the_readme(command: str) -> None:
    assert f"`{command}" in (ROOT / "README.md").read_text()


def test_every_command_has_an_example() -> None:
    from convo._docs import _walk

    for path, context in _walk(cli, None, "convo"):
        assert "Example" in context.get_help(), path


def test_db_upgrade_adds_convo_tables_to_another_apps_sqlite_on_purpose(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "app.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    con.commit()
    con.close()
    assert run("db", "current", "--db", f"sqlite:///{path}")[0] == 1
    assert run("db", "upgrade", "--db", f"sqlite:///{path}")[0] == 0
    with ConversationStore(f"sqlite:///{path}") as store:
        store.create()
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM users").fetchone() == (0,)
    con.close()


def _conversation(url: str, turns: int = 6) -> str:
    with ConversationStore(url) as store:
        conv = store.create(title="Demo", system="Be brief.")
        for i in range(turns):
            conv.add("user" if i % 2 == 0 else "assistant", f"turn {i} 🙂")
        conv.add(
            "assistant",
            [{"type": "tool_use", "id": "t1", "name": "search", "input": {"q": "x"}}],
        )
        conv.add("user", [{"type": "tool_result", "tool_use_id": "t1", "content": "found"}])
        return conv.id


def test_show_prints_the_whole_history(migrated_url: str) -> None:
    conv_id = _conversation(migrated_url)
    code, out, _ = run("show", conv_id, "--db", migrated_url)
    assert code == 0
    assert out.startswith(f"{conv_id} - Demo (8 turns)")
    assert "#1 user\nturn 0 🙂" in out
    assert '[calls tool search with {"q": "x"}]' in out
    assert "[tool result: found]" in out
    code, out, _ = run("show", conv_id, "--json", "--db", migrated_url)
    shown = json.loads(out)
    assert shown["conversation"]["title"] == "Demo"
    assert shown["conversation"]["system"] == "Be brief."
    assert shown["conversation"]["summary"] is None
    assert shown["conversation"]["archived_through_seq"] == 0
    assert shown["conversation"]["budget"] > 0
    records = shown["messages"]
    assert [r["seq"] for r in records] == list(range(1, 9))
    assert records[0]["content"] == [{"type": "text", "text": "turn 0 🙂"}]


def test_compact_then_show_context_and_history(migrated_url: str) -> None:
    conv_id = _conversation(migrated_url)
    code, out, _ = run("compact", conv_id, "--offline", "--db", migrated_url)
    assert code == 0
    # The latest exchange starts at turn 5 (turns 6-8 answer it, a tool pair included).
    assert "Archived turns 1-4" in out
    assert "by the extractive summarizer" in out
    code, out, _ = run("show", conv_id, "--context", "--db", migrated_url)
    assert code == 0
    assert "summary of turns 1-4" in out
    assert "[Extractive summary" in out
    assert "live turns 5-8" in out
    code, out, _ = run("show", conv_id, "--context", "--json", "--db", migrated_url)
    window = json.loads(out)
    assert window["summary_covers_turns"] == [1, 4]
    assert window["estimated_tokens"] <= window["budget"]
    assert window["request"]["messages"][0]["role"] == "user"
    # The history still holds every turn.
    shown = json.loads(run("show", conv_id, "--json", "--db", migrated_url)[1])
    assert len(shown["messages"]) == 8
    assert shown["conversation"]["archived_through_seq"] == 4
    assert shown["conversation"]["summary"].startswith("[Extractive summary")
    code, out, _ = run("compact", conv_id, "--offline", "--db", migrated_url)
    assert "Nothing to compact" in out


def test_compact_without_an_api_key_says_what_to_set(migrated_url: str) -> None:
    conv_id = _conversation(migrated_url)
    code, _, err = run("compact", conv_id, "--db", migrated_url)
    assert code == 1
    assert "ANTHROPIC_API_KEY" in err
    assert "stay live" in err
    assert "use --offline" in err
    assert err.count("could not summarize") == 1
    assert "Traceback" not in err


def test_show_unknown_conversation(migrated_url: str) -> None:
    code, _, err = run("show", "conv_nothere", "--db", migrated_url)
    assert code == 1
    assert err.strip() == "Error: conversation not found: 'conv_nothere'"
