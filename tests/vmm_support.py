"""A real QEMU (7.2) for the attachment tests, running as another uid, with no guest.

``qemu-system-x86_64 -machine pc`` with DIMM slots and the ``qtest`` accelerator: no guest
code runs, and the test drives the machine the way a guest would through the qtest socket:
reading and writing guest-physical memory (``read``/``write``), and the ACPI memory hot-plug
registers a guest's ACPI methods write to eject a DIMM (``outl 0xa00 SLOT`` selects the
slot, ``outb 0xa14 4`` acknowledges the remove event, ``outb 0xa14 8`` is the eject request:
QEMU then unplugs the DIMM and sends ``DEVICE_DELETED``). Without that eject a
``device_del`` stays pending forever, as with a guest that ignores it.

QEMU gets three sockets: ``ramd.qmp`` for the daemon, ``test.qmp`` for the test (a QMP monitor
serves one client at a time) and ``qtest.sock``. They are created by QEMU as root before
``-runas`` drops it to the unprivileged uid, in a directory of its own.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = shutil.which("qemu-system-x86_64")
#: The uid QEMU runs as (-runas): not the daemon's.
VMM_USER = "nobody"
VMM_UID = pwd.getpwnam(VMM_USER).pw_uid
#: Guest-physical base of the pc machine's hot-pluggable memory with 128 MiB of RAM.
DIMM_BASE = 1 << 32
#: The ACPI memory hot-plug registers of the pc machine (docs/specs/acpi_mem_hotplug.rst).
MHP_BASE = 0xA00


class Qemu:
    """A ``qemu-system-x86_64`` process as :data:`VMM_USER`; :meth:`stop` kills it."""

    def __init__(self) -> None:
        assert QEMU is not None, "qemu-system-x86_64 is not installed (see .ci/run)"
        self.dir = Path(tempfile.mkdtemp(prefix="ramd-vmm-"))
        self.dir.chmod(0o755)
        self.ramd_qmp = self.dir / "ramd.qmp"
        test_qmp = self.dir / "test.qmp"
        qtest = self.dir / "qtest.sock"
        self.proc = subprocess.Popen(
            [
                QEMU,
                "-machine",
                "pc",
                "-m",
                "128M,slots=4,maxmem=2G",
                "-nographic",
                "-nodefaults",
                "-qmp",
                f"unix:{self.ramd_qmp},server=on,wait=off",
                "-qmp",
                f"unix:{test_qmp},server=on,wait=off",
                "-qtest",
                f"unix:{qtest},server=on,wait=off",
                "-runas",
                VMM_USER,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "qemu.log", "wb"),  # noqa: SIM115
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        while not all(p.exists() for p in (self.ramd_qmp, test_qmp, qtest)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {(self.dir / 'qemu.log').read_text()}")
            time.sleep(0.02)
        _connect(test_qmp).close()  # once it listens (its file exists from bind on)
        self.qmp = QEMUMonitorProtocol(str(test_qmp))
        self.qmp.connect()
        self._qtest = _connect(qtest)
        self._qtest_buf = b""

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a QMP command on the test's monitor; its ``return`` (raises on an error)."""
        return self.qmp.cmd(name, **args)

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def xp(self, addr: int, length: int) -> bytes:
        """``length`` bytes of guest-physical memory at ``addr``, read with HMP ``xp``."""
        out = self.hmp(f"xp /{length}xb 0x{addr:x}")
        values = [w for line in out.splitlines() for w in line.split(":", 1)[1].split()]
        return bytes(int(v, 16) for v in values)

    def qtest(self, line: str) -> str:
        """One qtest command; its answer line (``OK ...``)."""
        self._qtest.sendall(line.encode() + b"\n")
        while b"\n" not in self._qtest_buf:
            chunk = self._qtest.recv(65536)
            if not chunk:
                raise EOFError("qtest socket closed")
            self._qtest_buf += chunk
        answer, self._qtest_buf = self._qtest_buf.split(b"\n", 1)
        text = answer.decode()
        if not text.startswith("OK"):
            raise RuntimeError(f"qtest {line!r}: {text}")
        return text

    def write_phys(self, addr: int, data: bytes) -> None:
        """Write guest-physical memory as the guest would (qtest ``write``)."""
        self.qtest(f"write 0x{addr:x} {len(data)} 0x{data.hex()}")

    def eject_dimm(self, slot: int) -> None:
        """What a guest's ACPI handler does for the DIMM in ``slot``: acknowledge the remove
        event (or a later DIMM in that slot would look asked for removal too), then eject."""
        self.qtest(f"outl 0x{MHP_BASE:x} {slot}")
        self.qtest(f"outb 0x{MHP_BASE + 0x14:x} 4")
        self.qtest(f"outb 0x{MHP_BASE + 0x14:x} 8")

    def objects(self) -> set[str]:
        return {o["name"] for o in self.cmd("qom-list", path="/objects")}

    def fdsets(self) -> list[dict[str, Any]]:
        return list(self.cmd("query-fdsets"))

    def uid(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
        raise AssertionError("no Uid line")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
        self._qtest.close()
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _connect(path: Path) -> Any:
    """A connection to ``path`` once it listens (its file exists from bind on)."""
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(str(path))
            return s
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def file_acl(path: str | os.PathLike[str]) -> bytes | None:
    """The access ACL of a file, None when it has only mode bits."""
    try:
        return os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return None
