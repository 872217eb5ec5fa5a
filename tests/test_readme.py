"""The README's shell examples run: every fenced block whose info string is ``sh runnable``,
in order, in one bash session, as a reader following the README would type them.

Only ``/tmp/`` is changed (to a temporary directory, so that runs do not collide); ``PATH``
starts with this interpreter's ``bin`` directory, as an activated virtualenv has it. The
README itself exports ``RAMD_SOCKET`` and starts the daemon in the background; after a block
that starts one, the session waits until ``ramctl`` reaches it (a reader is never that fast).
The install line (``pip install .``) is not run here: tests/test_packaging.py installs the
project into a fresh virtualenv.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK_RE = re.compile(r"^```sh runnable\n(.*?)^```$", re.MULTILINE | re.DOTALL)
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


def test_readme_marks_the_walk_through_and_ramctl_blocks_runnable() -> None:
    blocks = runnable_blocks()
    assert len(blocks) >= 2
    assert "export RAMD_SOCKET=/tmp/ramd.sock" in blocks[0]
    assert any(line.startswith("ramctl ") for line in blocks[1].splitlines())


def test_readme_runnable_blocks_run(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    assert (bindir / "ramd").exists() and (bindir / "ramctl").exists(), "pip install first"
    env = {k: v for k, v in os.environ.items() if k not in ("RAMD_SOCKET", "XDG_RUNTIME_DIR")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    script = tmp_path / "readme.sh"
    script.write_text(session(tmp_path))
    p = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, timeout=240
    )
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert "removed ram3" in out and "wrote 8 MiB (8388608 bytes) to ram3" in out
    assert "ready:" in err  # the README's daemon served the session, and was stopped
