"""The README's promises: its example runs, its commands exist, its test command is CI's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fakeapi import FakeMessagesAPI

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_example_is_the_quickstart_file() -> None:
    block = _python_blocks()[0]
    quickstart = (ROOT / "examples" / "quickstart.py").read_text()
    assert block.strip() in quickstart


def test_readme_example_runs_on_the_embedded_default(isolated_environment: Path) -> None:
    block = _python_blocks()[0]
    done = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, check=True
    )
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        "1 user Three things to do in Lisbon?",
        "2 assistant Ride tram 28, see Belém, and hear fado in Alfama.",
        "3 user Which of those is best at night?",
    ]
    assert lines[3] == "['Lisbon, 3 days']"
    assert (isolated_environment / ".local" / "share" / "convo" / "convo.db").exists()


def test_ci_runs_the_readme_test_command() -> None:
    command = "./scripts/install && ./scripts/test"
    assert f"```sh\n{command}\n```" in README
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_bring_your_own_client_example_runs(
    isolated_environment: Path, fake_api: FakeMessagesAPI
) -> None:
    block = _python_blocks()[2]
    env = {**os.environ, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake_api.base_url}
    done = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "echo: Summarise the plot of Hamlet in one line."
    assert lines[1].endswith(" input tokens")
    (request,) = fake_api.requests
    assert request.body["max_tokens"] == 500


def test_readme_send_and_stream_example_runs(
    isolated_environment: Path, fake_api: FakeMessagesAPI
) -> None:
    block = _python_blocks()[1]
    env = {**os.environ, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake_api.base_url}
    done = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("echo: Name three prime numbers. ")
    assert lines[1] == "echo: And three more?"
    assert lines[2] == "4 end_turn"
    assert [r.stream for r in fake_api.requests] == [False, True]


def test_readme_async_example_runs(isolated_environment: Path, fake_api: FakeMessagesAPI) -> None:
    (block,) = [b for b in _python_blocks() if "AsyncConversationStore()" in b]
    env = {**os.environ, "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": fake_api.base_url}
    done = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["echo: Hello!", "echo: And in French?", "complete 4"]
    assert [r.stream for r in fake_api.requests] == [False, True]


def test_the_architecture_table_names_every_module() -> None:
    """A newcomer finds where a behaviour lives from the README's table: every
    private module of the package is in it, and nothing that is not."""
    section = README.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(_[a-z_]+\.py)`", section))
    modules = {path.name for path in (ROOT / "convo").glob("_*.py")}
    assert listed == modules - {"__init__.py", "__main__.py"}
