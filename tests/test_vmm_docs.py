"""docs/vmm.md is what works: its ``sh step:NAME`` blocks run verbatim, in order, in one bash
session, against a real daemon and a real QEMU booting the test guest (tests/guest/, TCG
unless KVM is usable), and between the steps the test checks what the page promises.

Acceptance (issue 22): a QEMU restart keeps the guest's RAM byte for byte, also when ramd
itself restarts in between (``file`` block): the guest writes a random pattern into its RAM;
after the restart the whole block hashes the same, the second QEMU maps the same block (its
lease is on it, and the state it loaded is small: no RAM was copied), and the guest, running
on, reads its pattern back.

Acceptance (issue 23, whole-VM snapshot): device state (small) plus a ``ram-save`` image of the
block, restored (a) into a fresh QEMU on a block recreated by ``ram-load`` after the old one was
deleted: the guest reads its pattern back; (b) into a sealed ``memfd`` template: its bytes are
the snapshot's, a clone maps it privately and its guest reads the pattern back, and what the
clone's guest writes leaves the template as it was.

Only ``/tmp/`` in the page is changed (to a temporary directory). The session gets
``RAMD_SOCKET``, ``PATH`` with this interpreter's ``bin`` first (``ramctl``, ``qmp-shell``) and
the ``GUEST`` array the page describes: the test guest's kernel and initramfs, its serial
console on a Unix socket (with a log file), which the test uses to run commands in the guest.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu_support import READY, default_accel, guest_files

MiB = 1 << 20
DOC = Path(__file__).resolve().parent.parent / "docs" / "vmm.md"
STEP_RE = re.compile(r"^```sh step:(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
STEPS = [
    "start", "save", "quit", "incoming", "cont", "attach", "detach",
    "snapshot", "restore", "template", "clone", "stop",
]  # fmt: skip
#: Bound for one step or one guest command (a hung guest or QEMU, not a performance claim).
STEP_TIMEOUT = 300.0

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.guest,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU"),
]


def doc_steps() -> dict[str, str]:
    steps = STEP_RE.findall(DOC.read_text())
    return dict(steps)


def test_the_page_has_the_steps_the_test_runs() -> None:
    assert list(doc_steps()) == STEPS


class Shell:
    """One bash session (``set -e``): :meth:`step` types a block and waits for its end."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
        self._out = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._n = 0
        self.send("set -e\n")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._changed:
                self._out += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def step(self, text: str) -> str:
        """Run ``text``; what it printed. Fails if a command failed (bash exits: set -e)."""
        self._n += 1
        marker = f"@@STEP-DONE {self._n}@@"
        with self._changed:
            start = len(self._out)
        self.send(f"{text}\necho '{marker}'\n")
        deadline = time.monotonic() + STEP_TIMEOUT
        with self._changed:
            while marker.encode() not in self._out[start:]:
                left = deadline - time.monotonic()
                if not self._reader.is_alive() or left <= 0:
                    raise AssertionError(
                        f"step failed or hung:\n{text}\n--- output ---\n"
                        f"{self._out[start:].decode(errors='replace')}"
                    )
                self._changed.wait(left)
            return self._out[start:].decode(errors="replace").split(marker)[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("kill $(jobs -p) 2>/dev/null; wait; exit\n")
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join()


class Console:
    """The guest's serial console on a Unix socket: the command loop of tests/guest/init."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(STEP_TIMEOUT)
        self.sock.connect(str(path))
        self._buf = b""
        self._seq = 0

    def sh(self, command: str) -> str:
        """Run ``command`` in the guest; its output (fails unless it exits 0)."""
        self._seq += 1
        self.sock.sendall(f"{self._seq} {command}\n".encode())
        end = re.compile(rb"\n@@RAMD-GUEST-END %d (\d+)@@\n" % self._seq)
        while (found := end.search(self._buf)) is None:
            chunk = self.sock.recv(65536)
            assert chunk, f"console closed: {self._buf!r}"
            self._buf += chunk
        out, self._buf = self._buf[: found.start()], self._buf[found.end() :]
        assert found.group(1) == b"0", (command, out)
        return out.decode(errors="replace")

    def close(self) -> None:
        self.sock.close()


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def block_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def lease_pids(rpc: Raw, block: str) -> list[int]:
    holders = rpc.call("query-ram-blocks", id=block)[0]["holders"]
    return [h["pid"] for h in holders if h["kind"] == "lease"]


def private_mapping_of(pid: int, memfd: str) -> bool:
    """Whether ``pid`` maps the memfd named ``memfd`` (``/memfd:NAME``) privately (``rw-p``)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    perms = {line.split()[1] for line in lines if line.endswith(f"/memfd:{memfd} (deleted)")}
    return perms == {"rw-p"}


def block_bytes_sha256(env: dict[str, str], block: str, size: int, scratch: Path) -> str:
    """The sha256 of a block's first ``size`` bytes, read with ``ramctl read`` (any backend)."""
    out = scratch / f"{block}.bin"
    subprocess.run(
        [sys.executable, "-m", "ramd_client.cli", "read", block, "0", str(size), "-o", str(out)],
        env=env, check=True, timeout=STEP_TIMEOUT,
    )  # fmt: skip
    try:
        return block_sha256(str(out))
    finally:
        out.unlink()


def session_env(daemon: Daemon) -> dict[str, str]:
    return {
        **os.environ,
        "RAMD_SOCKET": str(daemon.path),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


@pytest.fixture
def vmdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ramd-vmmdoc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def memdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ramd-vmmdoc-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("restart_ramd", [False, True], ids=["qemu-restart", "ramd-restart-too"])
def test_the_vmm_how_to_restarts_qemu_keeping_the_guests_ram(
    start_daemon: Callable[..., Daemon], vmdir: Path, memdir: Path, restart_ramd: bool
) -> None:
    config = f'memory-dir = "{memdir}/mem"\n'
    daemon = start_daemon(config)
    steps = {name: text.replace("/tmp/", f"{vmdir}/") for name, text in doc_steps().items()}
    vm1 = vmdir / "vm1"
    vmlinuz, initramfs = guest_files()
    console_log = vm1 / "console.log"
    guest = [
        "-nodefaults",
        "-no-user-config",
        "-accel",
        default_accel(),
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initramfs),
        "-append",
        "console=ttyS0 panic=-1 memhp_default_state=online_movable",
        "-chardev",
        f"socket,id=con,path={vm1}/console.sock,server=on,wait=off,logfile={console_log}",
        "-serial",
        "chardev:con",
    ]
    shell = Shell(session_env(daemon), vmdir)
    consoles: list[Console] = []
    try:
        shell.send(f"GUEST=({' '.join(shlex.quote(a) for a in guest)})\n")
        shell.step(steps["start"])
        wait_for(lambda: console_log.exists() and READY in console_log.read_text(), "the guest")
        con = Console(vm1 / "console.sock")
        consoles.append(con)
        pattern = con.sh(
            "dd if=/dev/urandom of=/pattern bs=1M count=64 2>/dev/null && sha256sum /pattern"
        ).split()[0]
        with Raw(daemon.path) as rpc:
            (first_qemu,) = lease_pids(rpc, "vm1")
            path = rpc.call("query-ram-blocks", id="vm1")[0]["path"]
            assert "leased by 1" in rpc.error("ram-block-del", id="vm1")["message"]

        saved = shell.step(steps["save"])
        state = vm1 / "state"
        assert state.stat().st_size < MiB, saved  # device state only: RAM is not in it
        before = block_sha256(path)  # the guest is stopped: its RAM is still
        shell.step(steps["quit"])
        con.close()
        wait_for(lambda: not Path(f"/proc/{first_qemu}").exists(), "the first QEMU to exit")

        if restart_ramd:
            assert daemon.stop() == 0
            daemon = start_daemon(config)
            with Raw(daemon.path) as rpc:
                assert rpc.call("query-ram-blocks", id="vm1")[0]["path"] == path

        shell.step(steps["incoming"])
        with Raw(daemon.path) as rpc:
            (second_qemu,) = lease_pids(rpc, "vm1")
        assert second_qemu != first_qemu
        assert Path(f"/proc/{second_qemu}/comm").read_text().startswith("qemu-system")
        # the second QEMU runs from the same block: the guest's RAM is byte for byte the same
        assert block_sha256(path) == before
        shell.step(steps["cont"])
        con = Console(vm1 / "console.sock")
        consoles.append(con)
        assert con.sh("sha256sum /pattern").split()[0] == pattern

        memtotal = int(con.sh("grep MemTotal /proc/meminfo").split()[1])
        shell.step(steps["attach"])
        with Raw(daemon.path) as rpc:
            att = rpc.call("query-ram-blocks", id="dimm1")[0]["attachment"]
            assert (att["as"], att["vmm-pid"]) == ("pc-dimm", second_qemu)

        def grown() -> bool:
            return int(con.sh("grep MemTotal /proc/meminfo").split()[1]) == memtotal + 128 * 1024

        wait_for(grown, "the guest to online the DIMM")
        shell.step(steps["detach"])
        wait_for(lambda: int(con.sh("grep MemTotal /proc/meminfo").split()[1]) == memtotal,
                 "the guest to give the DIMM back")  # fmt: skip
        assert con.sh("sha256sum /pattern").split()[0] == pattern

        # whole-VM snapshot: device state (small) and the block's RAM image
        shell.step(steps["snapshot"])
        assert (vm1 / "snap.state").stat().st_size < MiB
        wait_for(lambda: not Path(f"/proc/{second_qemu}").exists(), "the second QEMU to exit")
        snapshot = block_sha256(path)

        # (a) into a fresh QEMU, on the block recreated from the image
        shell.step(steps["restore"])
        with Raw(daemon.path) as rpc:
            (restored_qemu,) = lease_pids(rpc, "vm1")
            assert rpc.call("query-ram-blocks", id="vm1")[0]["backend"] == "file"
        assert restored_qemu != second_qemu
        con = Console(vm1 / "console.sock")
        consoles.append(con)
        assert con.sh("sha256sum /pattern").split()[0] == pattern

        # (b) into a sealed memfd template, and a clone of it
        shell.step(steps["template"])
        env = session_env(daemon)
        with Raw(daemon.path) as rpc:
            info = rpc.call("query-ram-blocks", id="vm1")[0]
        assert (info["backend"], info["sealed"], info["size"]) == ("memfd", True, 256 * MiB)
        assert block_bytes_sha256(env, "vm1", 256 * MiB, vmdir) == snapshot
        shell.step(steps["clone"])
        with Raw(daemon.path) as rpc:
            (clone_qemu,) = lease_pids(rpc, "vm1")
        assert clone_qemu != restored_qemu
        assert private_mapping_of(clone_qemu, "ramd:vm1")
        con = Console(vm1 / "console.sock")
        consoles.append(con)
        assert con.sh("sha256sum /pattern").split()[0] == pattern
        con.sh("dd if=/dev/urandom of=/clone-own bs=1M count=4 2>/dev/null")  # tmpfs: 8M free
        assert con.sh("sha256sum /pattern").split()[0] == pattern
        assert block_bytes_sha256(env, "vm1", 256 * MiB, vmdir) == snapshot

        shell.step(steps["stop"])
        with Raw(daemon.path) as rpc:
            assert rpc.call("query-ram-blocks") == []
    finally:
        for con in consoles:
            con.close()
        shell.close()


def test_qemu_started_by_the_page_may_run_as_another_uid(
    start_daemon: Callable[..., Daemon], vmdir: Path, memdir: Path
) -> None:
    """The page's first step with ``-runas nobody`` in ``GUEST`` (and no guest): QEMU maps the
    fd it was given before it drops root, runs as nobody, and reads what ramd wrote; the
    page's last step ends it and removes the block."""
    daemon = start_daemon(f'memory-dir = "{memdir}/mem"\n')
    steps = {name: text.replace("/tmp/", f"{vmdir}/") for name, text in doc_steps().items()}
    shell = Shell(session_env(daemon), vmdir)
    try:
        shell.send("GUEST=(-nodefaults -accel tcg -S -runas nobody)\n")
        shell.step(steps["start"])
        with Raw(daemon.path) as rpc:
            rpc.call("ram-block-write", id="vm1", offset=0x1000, data="cmFtZCE=")  # "ramd!"
            wait_for(lambda: len(lease_pids(rpc, "vm1")) == 1, "the lease")
            (pid,) = lease_pids(rpc, "vm1")
            path = rpc.call("query-ram-blocks", id="vm1")[0]["path"]
        assert os.stat(path).st_mode & 0o077 == 0  # nobody could not open it by its path
        nobody = pwd.getpwnam("nobody").pw_uid

        def dropped() -> bool:
            status = Path(f"/proc/{pid}/status").read_text()
            return int(status.split("\nUid:")[1].split()[0]) == nobody

        wait_for(dropped, "QEMU to run as nobody")
        qmp = QEMUMonitorProtocol(str(vmdir / "vm1" / "qmp.sock"))
        qmp.connect()
        try:
            out = qmp.cmd("human-monitor-command", **{"command-line": "xp /5xb 0x1000"})
        finally:
            qmp.close()
        assert out.split(":")[1].split() == ["0x72", "0x61", "0x6d", "0x64", "0x21"]
        shell.step(steps["stop"])
    finally:
        shell.close()


def test_qemu_7_2_has_no_cpr_reboot_mode(vmdir: Path) -> None:
    """What the page says of cpr-reboot: this QEMU has no migration ``mode`` parameter (when
    a newer QEMU is installed, this fails, and the page must give the cpr-reboot recipe)."""
    qmp_path = vmdir / "probe.qmp"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(qmp_path.exists, "QEMU's QMP socket")
        qmp = QEMUMonitorProtocol(str(qmp_path))
        qmp.connect()
        try:
            version = qmp.cmd("query-version")["qemu"]
            params = qmp.cmd("query-migrate-parameters")
            caps = {c["capability"] for c in qmp.cmd("query-migrate-capabilities")}
        finally:
            qmp.close()
    finally:
        proc.kill()
        proc.wait()
    assert (version["major"], version["minor"]) == (7, 2)
    assert "mode" not in params
    assert "x-ignore-shared" in caps
