"""The splitter on Debian 12's own Python (3.11.2), whose regular expression engine matches
possessive repetitions wrongly (fixed in CPython 3.11.4): a string of more than 256 bytes
was skipped halfway and its message lost. The splitter must not depend on that."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")

SCRIPT = """
from ramd.transport.protocol.splitter import JsonSplitter
s = JsonSplitter(1 << 20, 64)
for n in (100, 256, 257, 500, 5000):
    for esc in ("", '\\\\"'):
        text = '{"pad": "%s%s%s"}' % (esc, "x" * n, esc)
        got = s.feed(text.encode() + b'{"next": 1}')
        assert got == [text.encode(), b'{"next": 1}'], (n, esc, got)
print("ok")
"""


def _system_python_311() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    out = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not _system_python_311(), reason="no /usr/bin/python3 of version 3.11 here")
def test_long_strings_split_right_on_the_system_python() -> None:
    path = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    proc = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert sys.version_info[:2] == (3, 11)
