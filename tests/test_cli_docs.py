"""Man pages and shell completions: what ``tools/cli_docs.py`` generates from the argparse
parsers is what is committed, the man pages render without a warning, and the bash
completion completes."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "cli_docs.py"
FILES = (
    "man/ramd.8",
    "man/ramctl.1",
    "completions/bash/ramd",
    "completions/bash/ramctl",
    "completions/zsh/_ramd",
    "completions/zsh/_ramctl",
)


def test_committed_files_are_the_generator_output(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, str(GENERATOR), str(tmp_path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    written = sorted(str(Path(line).relative_to(tmp_path)) for line in p.stdout.decode().split())
    assert written == sorted(FILES)
    for name in FILES:
        assert (ROOT / name).read_text() == (tmp_path / name).read_text(), (
            f"{name} is stale: run `python tools/cli_docs.py`"
        )


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", ["man/ramd.8", "man/ramctl.1"])
def test_man_pages_render_without_warnings(page: str) -> None:
    p = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(ROOT / page)],
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 0 and p.stderr == b""
    rendered = subprocess.run(
        ["groff", "-man", "-Tascii", str(ROOT / page)], capture_output=True, timeout=60
    ).stdout.decode()
    text = re.sub(".\b", "", rendered)  # overstrike bold and underline
    for word in ("NAME", "SYNOPSIS", "OPTIONS", "--socket", "--version"):
        assert word in text


def complete(program: str, words: list[str], cwd: Path = ROOT) -> list[str]:
    """What the bash completion of ``program`` offers for the command line ``words``
    (the last word is the one being completed)."""
    script = ROOT / "completions" / "bash" / program
    line = " ".join(shlex.quote(w) for w in [program, *words])
    code = (
        f"source {shlex.quote(str(script))}\n"
        f"COMP_WORDS=({line})\n"
        f"COMP_CWORD={len(words)}\n"
        f"_{program}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    p = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", code],
        capture_output=True,
        check=True,
        cwd=cwd,
        timeout=60,
    )
    return [w for w in p.stdout.decode().split("\n") if w]


def test_bash_completion_of_ramctl(tmp_path: Path) -> None:
    assert complete("ramctl", ["li"]) == ["list"]
    assert complete("ramctl", ["--socket", "/x.sock", "--timeout", "5", "wa"]) == ["watch"]
    assert complete("ramctl", ["list", "--j"]) == ["--json"]
    assert complete("ramctl", ["del", "ram0", "--if"]) == ["--if-exists"]
    assert complete("ramctl", ["watch", "RAM_BLOCK_RE"]) == [
        "RAM_BLOCK_RESIZED",
        "RAM_BLOCK_REMOVED",
    ]
    assert set(complete("ramctl", [""])) >= {"add", "del", "read", "watch", "call"}
    (tmp_path / "dump.bin").write_bytes(b"")
    assert complete("ramctl", ["read", "a", "0", "1", "-o", "du"], tmp_path) == ["dump.bin"]


def test_bash_completion_of_ramd() -> None:
    assert complete("ramd", ["--log-level", "w"]) == ["warning"]
    assert complete("ramd", ["--event-loop", ""]) == ["asyncio", "uvloop"]
    assert complete("ramd", ["--qmp"]) == ["--qmp-socket"]
