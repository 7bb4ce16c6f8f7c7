"""A wheel installed in a fresh virtual environment carries its migrations."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from convo._database import resolve_url
from tests.conftest import server_url

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `convo` console script of a fresh venv with the built wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", ROOT, cwd=work
    )
    (wheel,) = (work / "dist").glob("convo_store-*.whl")
    _run(sys.executable, "-m", "venv", work / "venv", cwd=work)
    _run(work / "venv/bin/python", "-m", "pip", "install", "-q", f"{wheel}[postgres]", cwd=work)
    return work / "venv" / "bin" / "convo"


@pytest.fixture
def empty_postgres_database() -> Iterator[str]:
    """A brand-new, empty PostgreSQL database, dropped afterwards."""
    admin_url = resolve_url(server_url("postgres"))
    name = f"convo_wheel_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.slow
def test_wheel_upgrades_an_empty_sqlite_file(installed_wheel: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert "is at revision" in _run(installed_wheel, "db", "upgrade", "--db", url, cwd=tmp_path)
    assert "matches" in _run(installed_wheel, "db", "check", "--db", url, cwd=tmp_path)
    history = _run(installed_wheel, "db", "history", cwd=tmp_path)
    assert "conversations and messages" in history
    # Installed as the convo-store distribution; still `import convo` and `convo`.
    assert _run(installed_wheel, "--version", cwd=tmp_path) == "convo, version 0.1.0\n"
    python = installed_wheel.parent / "python"
    shown = _run(python, "-m", "pip", "show", "convo-store", cwd=tmp_path)
    assert "Name: convo-store" in shown


@pytest.mark.slow
@pytest.mark.postgres
def test_wheel_upgrades_an_empty_postgres_database(
    installed_wheel: Path, empty_postgres_database: str, tmp_path: Path
) -> None:
    url = empty_postgres_database
    _run(installed_wheel, "db", "upgrade", "--db", url, cwd=tmp_path)
    assert "(head)" in _run(installed_wheel, "db", "current", "--db", url, cwd=tmp_path)
    assert "matches" in _run(installed_wheel, "db", "check", "--db", url, cwd=tmp_path)
    python = installed_wheel.parent / "python"
    script = (
        "import sys, convo\n"
        "assert 'site-packages' in convo.__file__, convo.__file__\n"
        "store = convo.ConversationStore(sys.argv[1])\n"
        "store.create().add('user', 'from the wheel')\n"
        "print(len(store.list()))\n"
    )
    assert _run(python, "-c", script, url, cwd=tmp_path).strip() == "1"
