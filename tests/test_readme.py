"""The README's examples are what the code does.

- Every fenced block whose info string is ``sh runnable`` runs, in order, in one bash
  session, as a reader following the README would type them. Only ``/tmp/`` is changed (to a
  temporary directory, so that runs do not collide); ``PATH`` starts with this interpreter's
  ``bin`` directory, as an activated virtualenv has it. The README itself exports
  ``RAMD_SOCKET`` and starts the daemon in the background; after a block that starts one, the
  session waits until ``ramctl`` reaches it (a reader is never that fast). The install line
  (``pip install .``) is not run here: tests/test_packaging.py installs the project into a
  fresh virtualenv.
- Every ``sh transcript`` block (a ``socat`` session: JSON-RPC lines) is replayed against a
  fresh daemon: each line that is a JSON object with an ``"id"`` and a ``"method"`` is sent,
  and each other line must match the next line the daemon sends.
- Every ``sh session`` block (``$ COMMAND`` lines, each followed by what it prints) is
  replayed against a fresh daemon: each command runs in bash with stdout and stderr together,
  and what it prints must match the lines shown, as many as shown.

In shown answers ``...`` stands for any text (addresses, times); everything else must be
exactly what the code printed, so a field the code no longer has cannot stay in the README.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from daemon import Daemon

from ramd.api.commands import COMMANDS

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK_RE = re.compile(r"^```sh runnable\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TRANSCRIPT_RE = re.compile(r"^```sh transcript\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SESSION_RE = re.compile(r"^```sh session\n(.*?)^```$", re.MULTILINE | re.DOTALL)
WAIT_FOR_DAEMON = (
    "for _ in $(seq 600); do ramctl version >/dev/null 2>&1 && break; sleep 0.1; done\n"
)


def runnable_blocks() -> list[str]:
    return BLOCK_RE.findall(README.read_text())


def session(tmp: Path) -> str:
    """One bash script: the runnable blocks, ``/tmp/`` moved to ``tmp``."""
    parts = [
        "set -euo pipefail\n",
        "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n",  # stop what the README started
    ]
    for block in runnable_blocks():
        parts.append(block.replace("/tmp/", f"{tmp}/"))
        if re.search(r"&\s*(#.*)?$", block, re.MULTILINE):
            parts.append(WAIT_FOR_DAEMON)
    return "".join(parts)


def venv_env(**extra: str) -> dict[str, str]:
    """The environment of an activated virtualenv of this interpreter, no ramd variables."""
    bindir = Path(sys.executable).parent
    assert (bindir / "ramd").exists() and (bindir / "ramctl").exists(), "pip install first"
    env = {k: v for k, v in os.environ.items() if k not in ("RAMD_SOCKET", "XDG_RUNTIME_DIR")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def shown(line: str) -> re.Pattern[str]:
    """A shown line as a pattern: literal, but ``...`` matches any text (``,...``: none, or
    a comma and any text: the fields after the last one shown, if any)."""
    parts = [".*".join(map(re.escape, part.split("..."))) for part in line.split(",...")]
    return re.compile("(?:,.*)?".join(parts))


def check_shown(expected: list[str], got: list[str], what: str) -> None:
    assert len(got) == len(expected), f"{what}: README shows\n{expected}\nthe code printed\n{got}"
    for want, line in zip(expected, got, strict=True):
        assert shown(want).fullmatch(line), (
            f"{what}: README shows\n{want}\nthe code printed\n{line}"
        )


def test_readme_marks_the_walk_through_and_ramctl_blocks_runnable() -> None:
    blocks = runnable_blocks()
    assert len(blocks) >= 2
    assert "export RAMD_SOCKET=/tmp/ramd.sock" in blocks[0]
    assert any(line.startswith("ramctl ") for line in blocks[1].splitlines())
    text = README.read_text()
    assert TRANSCRIPT_RE.findall(text) and SESSION_RE.findall(text)


def test_readme_runnable_blocks_run(tmp_path: Path) -> None:
    script = tmp_path / "readme.sh"
    script.write_text(session(tmp_path))
    p = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=venv_env(), capture_output=True, timeout=240
    )
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "removed ram3" in out and "wrote 8 MiB (8388608 bytes) to ram3" in out
    assert "ready:" in err  # the README's daemon served the session, and was stopped


def _is_request(line: str) -> bool:
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    return isinstance(doc, dict) and "id" in doc and "method" in doc


def test_readme_transcripts_are_what_the_daemon_answers(
    start_daemon: Callable[..., Daemon],
) -> None:
    for block in TRANSCRIPT_RE.findall(README.read_text()):
        lines = block.splitlines()
        assert lines[0].startswith("$ socat - UNIX-CONNECT:")
        d = start_daemon()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(d.path))
            answers = s.makefile("rb")
            for line in lines[1:]:
                if _is_request(line):
                    s.sendall(line.encode() + b"\n")
                else:
                    got = answers.readline().decode().rstrip("\n")
                    check_shown([line], [got], "transcript")
        d.stop()


def test_readme_sessions_are_what_ramctl_prints(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    for block in SESSION_RE.findall(README.read_text()):
        d = start_daemon()
        env = venv_env(RAMD_SOCKET=str(d.path), COLUMNS="200")
        steps: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            else:
                steps[-1][1].append(line)
        for command, expected in steps:
            p = subprocess.run(
                ["bash", "-c", command],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
                env=env,
                timeout=120,
            )
            check_shown(expected, p.stdout.decode().splitlines(), f"$ {command}")
        d.stop()


def test_readme_lists_every_command() -> None:
    text = README.read_text()
    table = text.split("\nCommands (`ramctl commands`", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([a-z][a-z_-]*)`", table.split("\nErrors:", 1)[0]))
    assert listed >= set(COMMANDS), f"not in the README: {sorted(set(COMMANDS) - listed)}"
