"""``examples/mapper.c`` (docs/protocol.md §8 in C): built with ``cc`` and run against a real
daemon. The program maps a ``memfd`` block, and this test grows, shrinks and deletes the block
from another connection: every shrink and the removal wait for the program's
``ram-block-ack`` (the acknowledgement timeout is far longer than the test, so an answer means
the program acknowledged), the program sees each event, never gets ``SIGBUS``, exits 0, and
the daemon gives the memory back (the memfd shrinks, then is closed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from daemon import Daemon, Raw

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mapper.c"
MIB = 1024 * 1024


def build(tmp: Path) -> Path:
    """``examples/mapper.c`` compiled with every warning an error."""
    cc = shutil.which("cc")
    assert cc is not None, "a C compiler (cc) is needed: .ci/run installs one"
    exe = tmp / "mapper"
    flags = ["-std=c11", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O2"]
    p = subprocess.run([cc, *flags, "-o", str(exe), str(EXAMPLE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return exe


def memfd_sizes(pid: int) -> list[int]:
    """Sizes of the memfd files process ``pid`` holds open."""
    sizes = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:"):
                sizes.append(os.stat(f"/proc/{pid}/fd/{name}").st_size)
        except FileNotFoundError:
            continue  # closed meanwhile
    return sizes


class Program:
    """The running example; its stdout read line by line."""

    def __init__(self, exe: Path, socket_path: Path, block_id: str) -> None:
        self.proc = subprocess.Popen(
            [str(exe), str(socket_path), block_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.seen: list[str] = []

    def until(self, prefix: str) -> str:
        """Lines up to the next one starting with ``prefix`` (that one returned)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.seen.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return self.seen[-1]
        raise AssertionError(f"exited before {prefix!r}: {self.finish()}")

    def finish(self) -> tuple[int, list[str], str]:
        """Its exit status, every line it printed and its stderr, once it exited. (The rest
        of stdout is read through the same buffered file as :meth:`until`: ``communicate``
        would read the pipe itself and miss lines that file already holds.)"""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.seen += self.proc.stdout.read().splitlines()
        err = self.proc.stderr.read()
        return self.proc.wait(timeout=30), self.seen, err


def test_c_mapper_follows_resizes_and_removal(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    exe = build(tmp_path)
    d = start_daemon("[limits]\nack-timeout = 120\n")
    with Raw(d.path, timeout=60) as r:
        r.call("ram-block-add", id="c0", size=1 * MIB, **{"max-size": 64 * MIB, "backend": "memfd"})
        prog = Program(exe, d.path, "c0")
        try:
            assert (
                prog.until("mapped ") == "mapped c0 size=1048576 max-size=67108864 page-size=4096"
            )
            assert r.call("query-ram-blocks", id="c0")[0]["mappers"] == 1
            # what the program wrote through its mapping is the block's memory
            page1 = r.call("ram-block-read", id="c0", offset=4096, length=8)["data"]
            assert page1 == "JiYmJiYmJiY="  # 8 bytes of 1 * 31 + 7 = 0x26

            r.call("ram-block-resize", id="c0", size=8 * MIB)  # grow: no acknowledgement
            assert prog.until("grew to ") == "grew to 8388608: old contents intact, tail filled"

            shrunk = r.call("ram-block-resize", id="c0", size=2 * MIB)  # waits for the ack
            assert shrunk["size"] == 2 * MIB
            assert prog.until("sent ram-block-ack") == "sent ram-block-ack seq=3"
            assert memfd_sizes(d.pid) == [2 * MIB]  # the tail was released at once

            assert r.call("ram-block-del", id="c0") == {}  # waits for the ack too
            code, seen, err = prog.finish()
        finally:
            if prog.proc.poll() is None:
                prog.proc.kill()
                prog.proc.wait()
        assert code != -signal.SIGBUS, "the program touched released memory"
        assert code == 0, f"exit {code}: {err}\n" + "\n".join(seen)
        assert seen == [
            "mapped c0 size=1048576 max-size=67108864 page-size=4096",
            "event RAM_BLOCK_RESIZED seq=2 1048576 -> 8388608 ack=false",
            "grew to 8388608: old contents intact, tail filled",
            "event RAM_BLOCK_RESIZED seq=3 8388608 -> 2097152 ack=true",
            "shrank to 2097152: tail unmapped, contents intact",
            "sent ram-block-ack seq=3",
            "answer to request 2: ok",
            "event RAM_BLOCK_REMOVED seq=4 ack=true",
            "unmapped and closed the fd",
            "sent ram-block-ack seq=4",
            "answer to request 3: ok",
            "done",
        ], seen
        assert r.call("query-ram-blocks") == []
        stats = r.call("query-stats")
        assert (stats["blocks"], stats["used"], stats["reserved"]) == (0, 0, 0)
        assert memfd_sizes(d.pid) == []  # the daemon closed the block's memfd
    assert "did not acknowledge" not in d.log_text()
