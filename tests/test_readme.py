"""The README's promises: its example runs, its commands exist, its test command is CI's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_example_is_the_quickstart_file() -> None:
    (block,) = _python_blocks()
    quickstart = (ROOT / "examples" / "quickstart.py").read_text()
    assert block.strip() in quickstart


def test_readme_example_runs_on_the_embedded_default(isolated_environment: Path) -> None:
    (block,) = _python_blocks()
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
