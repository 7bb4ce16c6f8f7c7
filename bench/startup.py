"""How long the ``convo`` command takes to start: ``--help``, ``list``, ``send``.

Each command runs as a fresh process (the installed ``convo`` console script of
the venv), several times after untimed warm-up runs, like hyperfine: min,
median and p95 wall time. ``convo list`` reads an embedded SQLite file with 50
conversations; ``convo send`` talks to the fake Messages API on loopback (one
short streamed reply), so it includes ``import anthropic``. Reference rows
show the interpreter alone and the imports the commands pay for.

    python bench/startup.py [--quick] [--record]

Target: ``convo --help`` and ``convo list`` at most 300 ms (median) on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c

TARGET_S = 0.300


def _run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()}")
    return time.perf_counter() - start


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    repeat, warmup = (5, 1) if args.quick else (30, 3)
    python = sys.executable
    convo = str(Path(python).parent / "convo")
    from convo import ConversationStore
    from tests.fakeapi import FakeMessagesAPI

    with tempfile.TemporaryDirectory() as tmp, FakeMessagesAPI() as fake:
        url = f"sqlite:///{tmp}/startup.db"
        with ConversationStore(url) as store:
            for i in range(50):
                store.create(title=f"conversation {i}").add("user", f"hello {i}")
            conv_id = store.create(title="send").id
        env = {
            **os.environ,
            "CONVO_DATABASE_URL": url,
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": fake.base_url,
            "HOME": tmp,
        }
        cases = [
            ("python -c pass (the interpreter alone)", [python, "-c", "pass"]),
            (
                "python -c 'import sqlalchemy.orm' (reference)",
                [python, "-c", "import sqlalchemy.orm"],
            ),
            ("python -c 'import anthropic' (reference)", [python, "-c", "import anthropic"]),
            ("convo --help", [convo, "--help"]),
            ("convo list", [convo, "list"]),
            ("convo list --json", [convo, "list", "--json"]),
            ("convo show ID (opens the store)", [convo, "show", conv_id]),
            ("convo send ID hi (fake API, loopback)", [convo, "send", conv_id, "hi"]),
        ]
        rows = []
        medians = {}
        for label, argv in cases:
            samples = c.timed(lambda argv=argv: _run(argv, env), repeat, warmup=warmup)
            medians[label] = c.median(samples)
            rows.append(
                (
                    label,
                    c.fmt_ms(min(samples)),
                    c.fmt_ms(c.median(samples)),
                    c.fmt_ms(c.percentile(samples, 95)),
                )
            )
    body = c.table(["command", "min ms", "median ms", "p95 ms"], rows)
    verdicts = []
    for label in ("convo --help", "convo list"):
        ok = medians[label] <= TARGET_S
        verdicts.append(
            f"- `{label}`: median {c.fmt_ms(medians[label])} ms; target <= "
            f"{TARGET_S * 1000:.0f} ms: **{'met' if ok else 'not met'}**."
        )
    store = c.fmt_ms(medians["convo show ID (opens the store)"])
    verdicts.append(
        "- `convo list` (and `--json`) reads the embedded SQLite file with the standard "
        "library when it is at the current schema (`convo/_embedded.py`), loading neither "
        "SQLAlchemy nor convo's models. A server database, or a file to create or upgrade, "
        f"goes through the store instead, which costs what `convo show` does ({store} ms)."
    )
    text = (
        f"{repeat} timed runs per command after {warmup} untimed; wall time of a fresh "
        "process, as a user sees it. The machine was shared (see the interpreter's own "
        "startup): compare rows with each other rather than with another run.\n\n"
        f"{body}\n\n" + "\n".join(verdicts) + "\n"
        "- `import convo` loads neither SQLAlchemy nor the SDK: public names are imported on "
        "first use, the CLI imports the library inside each command, and only commands that "
        "call the API import `anthropic`.\n"
    )
    print(text)
    if args.record:
        c.record("startup", text, postgres_url=None, command=c.command_line())


if __name__ == "__main__":
    main()
