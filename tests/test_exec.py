"""``ramctl exec``: a program started with leases of RAM blocks (docs/protocol.md §12), QEMU's main
RAM among them. Real daemon, real ramctl, real QEMU."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import Daemon, Raw

MiB = 1 << 20
RAMCTL = [sys.executable, "-m", "ramd_client.cli"]


def _ramctl(d: Daemon, *args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*RAMCTL, "--socket", str(d.path), *args], text=True, stdout=subprocess.PIPE, **kw
    )


def _eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_exec_passes_leased_fds_to_the_program_in_the_same_process(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon()
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="a", size=4 * MiB, backend="memfd", **{"max-size": 8 * MiB})
        rpc.call("ram-block-add", id="b", size=2 * MiB, backend="memfd")
        script = (
            "import os, sys\n"
            "print(os.getpid(), *(os.fstat(int(fd)).st_size for fd in sys.argv[1:]), flush=True)\n"
            "sys.stdin.read()\n"
        )
        proc = _ramctl(
            d,
            "exec",
            "--block",
            "a",
            "--block",
            "b",
            "--",
            sys.executable,
            "-c",
            script,
            "{fd:a}",
            "{fd:b}",
            stdin=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        pid, size_a, size_b = map(int, proc.stdout.readline().split())
        assert pid == proc.pid  # exec, not a child
        assert (size_a, size_b) == (4 * MiB, 2 * MiB)
        info = rpc.call("query-ram-blocks", id="a")[0]
        assert info["holders"] == [{"kind": "lease", "pid": proc.pid, "uid": os.getuid()}]
        assert "leased by 1" in rpc.error("ram-block-resize", id="a", size=MiB)["message"]
        assert "leased by 1" in rpc.error("ram-block-del", id="b")["message"]
        assert rpc.call("ram-block-resize", id="a", size=8 * MiB)["size"] == 8 * MiB
        proc.stdin.close()
        assert proc.wait(10) == 0
        _eventually(lambda: rpc.call("query-ram-blocks", id="a")[0]["leases"] == 0)
        assert rpc.call("ram-block-resize", id="a", size=MiB)["size"] == MiB
        assert rpc.call("ram-block-del", id="b") == {}


def test_exec_refusals_leave_no_lease_and_say_why(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="a", size=MiB, backend="memfd")
        rpc.call("ram-block-add", id="anon", size=MiB)
        for args, status, text in [
            (["--block", "a", "--block", "anon", "--", "true"], 1, "is not shared"),
            (["--block", "a", "--", "true", "{fd:zz}"], 2, "{fd:zz} names no --block"),
            (["--block", "a", "--", "/nonexistent/prog"], 127, "No such file"),
            (["--block", "a"], 2, "give the program"),
        ]:
            proc = _ramctl(d, "exec", *args, stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == status, (args, err)
            assert text in err, err
        _eventually(lambda: rpc.call("query-stats")["clients"] == 1)
        assert rpc.call("query-ram-blocks", id="a")[0]["leases"] == 0


QEMU = shutil.which("qemu-system-x86_64")


def _qmp(path: Path, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
    """Negotiate on QEMU's QMP socket and run ``commands``; their returns."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        deadline = time.monotonic() + 20
        while True:  # the socket file exists from bind on; it accepts from listen on
            try:
                s.connect(str(path))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, f"{path} never listened"
                time.sleep(0.02)
        f = s.makefile("rwb")
        json.loads(f.readline())
        out = []
        for name, args in (("qmp_capabilities", {}), *commands):
            f.write(json.dumps({"execute": name, "arguments": args}).encode())
            f.flush()
            while "return" not in (msg := json.loads(f.readline())):
                assert "error" not in msg, msg
            out.append(msg["return"])
        return out[1:]


def test_qemu_main_ram_from_a_block_with_one_command(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The docs/vmm.md recipe: QEMU's main RAM is a ramd block; bytes written through ramd
    are read by QEMU at guest-physical 0; the block is leased meanwhile."""
    assert QEMU is not None, "qemu-system-x86_64 is missing: .ci/run installs it"
    d = start_daemon()
    qmp = tmp_path / "qemu.qmp"
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="vm1", size=64 * MiB, backend="memfd")
        rpc.call("ram-block-write", id="vm1", offset=0, data=base64.b64encode(b"ramd!").decode())
        proc = _ramctl(
            d,
            "exec",
            "--block",
            "vm1",
            "--",
            str(QEMU),
            "-machine",
            "pc,accel=tcg,memory-backend=ram0",
            "-m",
            "64M",
            "-object",
            "memory-backend-file,id=ram0,mem-path=/proc/self/fd/{fd},size=64M,share=on",
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
        )
        try:
            _eventually(qmp.exists)
            (xp,) = _qmp(qmp, ("human-monitor-command", {"command-line": "xp /5xb 0"}))
            assert xp.split(":")[1].split() == ["0x72", "0x61", "0x6d", "0x64", "0x21"]
            info = rpc.call("query-ram-blocks", id="vm1")[0]
            assert info["holders"] == [{"kind": "lease", "pid": proc.pid, "uid": os.getuid()}]
            assert "leased" in rpc.error("ram-block-del", id="vm1")["message"]
        finally:
            proc.terminate()
            proc.wait(20)
        _eventually(lambda: rpc.call("query-ram-blocks", id="vm1")[0]["leases"] == 0)
        assert rpc.call("ram-block-del", id="vm1") == {}
