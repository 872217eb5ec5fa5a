"""Real QEMU processes for tests, optionally booting the test guest (tests/guest/).

:class:`Qemu` starts ``qemu-system-x86_64`` with two QMP sockets (QEMU's monitor serves one
client at a time: one for the code under test, one for the test), the serial console on the
process's stdin/stdout, and, when ``kernel`` is true, the guest that ``tests/guest/prepare.py``
built (Debian's kernel and busybox; its ``/init`` runs a command loop on the console, see
``tests/guest/init``). KVM is used when ``/dev/kvm`` is usable (:func:`kvm_usable`), TCG
otherwise; ``RAMD_TEST_ACCEL=tcg`` (or ``kvm``) forces one for every QEMU a test starts.

Ownership: a :class:`Qemu` owns its process, the thread that reads its console and its
directory (other uids can enter it: QEMU may run as another uid, see ``runas``).
:meth:`Qemu.close` kills the process, waits for it and removes the directory: no process is
left behind. Console commands are sent one at a time (a lock orders callers from several
threads); QMP goes through ``qemu.qmp``'s :class:`QMPClient` (:meth:`Qemu.qmp`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType

from guest import prepare
from qemu.qmp import QMPClient

MiB = 1024 * 1024
READY = "@@RAMD-GUEST-READY@@\n"  # whole line: commands' output starts after it
_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_PT_LOAD = 1
# Longest command line the guest's console reads in one line (canonical mode: 4096 with "\n").
_MAX_COMMAND = 4000


class GuestNotPrepared(RuntimeError):
    """The guest kernel and initramfs are not in the cache: ``.ci/run`` builds them."""


class GuestError(RuntimeError):
    """The guest's console did not answer as expected (its transcript is in the message)."""


def qemu_binary() -> str:
    """``qemu-system-x86_64`` on PATH (``.ci/run`` installs Debian's ``qemu-system-x86``)."""
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise RuntimeError(
            "qemu-system-x86_64 is not installed: .ci/run installs it "
            "(apt-get install --no-install-recommends qemu-system-x86)"
        )
    return path


@functools.cache
def kvm_usable() -> bool:
    """Whether KVM can run the guest at hardware speed: the CPU has hardware virtualization
    (``vmx``/``svm`` in ``/proc/cpuinfo``) and this process can create a KVM VM
    (``/dev/kvm`` opens, speaks API 12, ``KVM_CREATE_VM`` succeeds). A QEMU started by it,
    also with ``-runas``, can then use KVM (QEMU opens ``/dev/kvm`` before switching uid).

    The flag check matters: some sandboxes offer a ``/dev/kvm`` without hardware
    virtualization, where the guest's BIOS and early boot run orders of magnitude slower
    than under TCG (measured: no console output in 240 s, TCG at the prompt in 3 s)."""
    flags = set()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    if not flags & {"vmx", "svm"}:
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION) != 12:
            return False
        os.close(fcntl.ioctl(fd, _KVM_CREATE_VM, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def default_accel() -> str:
    """``$RAMD_TEST_ACCEL`` when set, else ``kvm`` when usable, else ``tcg``."""
    forced = os.environ.get("RAMD_TEST_ACCEL")
    if forced:
        return forced
    return "kvm" if kvm_usable() else "tcg"


def guest_files() -> tuple[Path, Path]:
    """The cached guest's kernel and initramfs, built from this checkout's sources."""
    guest = prepare.ready_guest()
    if guest is None:
        raise GuestNotPrepared(
            "THE TEST GUEST IS NOT PREPARED for these sources (tests/guest/): run "
            "`python3 tests/guest/prepare.py` (.ci/run does) to download Debian's kernel "
            f"and busybox and build the initramfs into {prepare.cache_root()}"
        )
    return guest / "vmlinuz", guest / "initramfs.cpio.gz"


class Qemu:
    """A ``qemu-system-x86_64`` process; use as a context manager, or call :meth:`close`.

    ``machine``: ``pc`` or ``q35``. ``memory``/``maxmem`` in MiB; ``slots`` DIMM slots
    (``maxmem`` defaults to ``memory`` plus 1 GiB when ``slots`` is set). ``kernel``: boot the
    test guest and wait for its console loop (:attr:`boot_seconds`). ``paused``: ``-S``.
    ``runas``: ``(uid, gid)`` QEMU switches to after setting up (``-runas``; it opens
    ``/dev/kvm``, the kernel and its sockets before). ``args``: more QEMU arguments.
    ``append``: more kernel command line.
    """

    def __init__(
        self,
        *,
        machine: str = "pc",
        accel: str | None = None,
        memory: int = 256,
        slots: int = 0,
        maxmem: int | None = None,
        kernel: bool = True,
        paused: bool = False,
        runas: tuple[int, int] | None = None,
        args: Sequence[str] = (),
        append: str = "",
        boot_timeout: float = 240.0,
    ) -> None:
        self.accel = accel or default_accel()
        binary = qemu_binary()
        files = guest_files() if kernel else None
        self.dir = Path(tempfile.mkdtemp(prefix="ramd-qemu-"))
        self.dir.chmod(0o755)
        self.qmp_path = self.dir / "qmp.sock"
        self.qmp2_path = self.dir / "qmp2.sock"
        self.boot_seconds: float | None = None
        self._console = bytearray()
        self._changed = threading.Condition()
        self._command_lock = threading.Lock()
        self._seq = 0
        mem = f"{memory}M"
        if slots or maxmem is not None:
            mem += f",slots={slots},maxmem={maxmem if maxmem is not None else memory + 1024}M"
        cmd = [
            binary,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-machine",
            f"{machine},accel={self.accel}",
            "-m",
            mem,
            "-chardev",
            "stdio,id=console,signal=off",
            "-serial",
            "chardev:console",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp",
            f"unix:{self.qmp2_path},server=on,wait=off",
        ]
        if files is not None:
            vmlinuz, initramfs = files
            cmdline = f"console=ttyS0 panic=-1 memhp_default_state=online_movable {append}"
            cmd += ["-kernel", str(vmlinuz), "-initrd", str(initramfs), "-append", cmdline]
        if paused:
            cmd.append("-S")
        if runas is not None:
            cmd += ["-runas", f"{runas[0]}:{runas[1]}"]
        cmd += list(args)
        self.command = cmd
        self._stderr = open(self.dir / "stderr", "wb")  # noqa: SIM115 (closed by close())
        started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        try:
            self._wait_monitor(started + 30.0)
            if kernel:
                self._wait_console(READY, started + boot_timeout)
                self.boot_seconds = time.monotonic() - started
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Qemu:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> int:
        """Kill QEMU (if still running), wait for it, remove its directory; its exit code."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        self._reader.join()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return code

    # -- console -------------------------------------------------------------------------

    def _read_console(self) -> None:
        """Thread: append everything QEMU's serial console prints, until EOF."""
        stdout = self.proc.stdout
        if stdout is None:
            return
        fd = stdout.fileno()
        while chunk := os.read(fd, 65536):
            with self._changed:
                self._console += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def console_text(self) -> str:
        """All the console printed so far."""
        with self._changed:
            return self._console.decode(errors="replace")

    def stderr_text(self) -> str:
        return (self.dir / "stderr").read_text(errors="replace")

    def _failure(self, what: str) -> GuestError:
        return GuestError(
            f"{what} (qemu pid {self.pid}, exit {self.proc.poll()}, accel {self.accel})\n"
            f"--- stderr ---\n{self.stderr_text()}\n--- console ---\n{self.console_text()}"
        )

    def _wait_console(
        self, pattern: str | re.Pattern[str], deadline: float, start: int = 0
    ) -> re.Match[str]:
        """The first match of ``pattern`` in the console from byte ``start``; raises
        :class:`GuestError` when QEMU exits or ``deadline`` (monotonic) passes first."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        with self._changed:
            while True:
                found = regex.search(self._console[start:].decode(errors="replace"))
                if found is not None:
                    return found
                if not self._reader.is_alive():
                    raise self._failure(f"QEMU closed its console before {regex.pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._failure(f"no {regex.pattern!r} on the console in time")
                self._changed.wait(left)

    def _wait_monitor(self, deadline: float) -> None:
        """Until QEMU's main loop runs: both QMP sockets accept connections and one answers
        ``qmp_capabilities`` (the greeting alone comes from the monitor's own thread, maybe
        before QEMU switched to ``runas``); the probe connections are closed after."""
        for path in (self.qmp_path, self.qmp2_path):
            while True:
                if self.proc.poll() is not None:
                    raise self._failure("QEMU exited at start")
                if time.monotonic() > deadline:
                    raise self._failure(f"QEMU does not listen on {path}")
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(str(path))
                    except (FileNotFoundError, ConnectionRefusedError):
                        time.sleep(0.02)
                        continue
                    if path == self.qmp2_path:
                        self._negotiate(probe, deadline)
                    break

    def _negotiate(self, probe: socket.socket, deadline: float) -> None:
        probe.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            with probe.makefile("rb") as reader:
                greeting = reader.readline()
                probe.sendall(b'{"execute": "qmp_capabilities"}\n')
                answer = reader.readline()
        except OSError as e:
            raise self._failure(f"QMP did not answer: {e}") from e
        if not greeting.startswith(b'{"QMP"') or not answer.startswith(b'{"return"'):
            raise self._failure(f"QMP did not answer: {greeting!r} {answer!r}")

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run one shell command line in the guest; its exit code and its output (stdout and
        stderr). The guest runs commands one at a time, in the order they are sent."""
        if "\n" in command or len(command) > _MAX_COMMAND:
            raise ValueError("a guest command is one line of at most 4000 characters")
        stdin = self.proc.stdin
        if stdin is None:
            raise GuestError("QEMU has no console input")
        with self._command_lock:
            self._seq += 1
            seq = self._seq
            with self._changed:
                start = len(self._console)
            stdin.write(f"{seq} {command}\n".encode())
            stdin.flush()
            end = re.compile(rf"\n@@RAMD-GUEST-END {seq} (\d+)@@\n")
            found = self._wait_console(end, time.monotonic() + timeout, start)
        with self._changed:
            text = self._console[start:].decode(errors="replace")
        return int(found.group(1)), text[: found.start()]

    def sh(self, command: str, timeout: float = 120.0) -> str:
        """:meth:`run`, raising :class:`GuestError` unless the command exits 0."""
        code, out = self.run(command, timeout)
        if code != 0:
            raise self._failure(f"guest command {command!r} exited {code}: {out!r}")
        return out

    def _kcore_offset(self, address: int, length: int) -> int:
        """Where guest-physical ``[address, address + length)`` is in the guest's
        ``/proc/kcore`` (read anew each time: it follows memory hot-plug)."""
        header = _unbase64(self.sh("dd if=/proc/kcore bs=4096 count=1 2>/dev/null | base64"))
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        if phoff + phnum * phentsize > len(header):
            raise GuestError(f"/proc/kcore has more program headers ({phnum}) than read")
        for i in range(phnum):
            kind, _flags, offset, _vaddr, paddr, _filesz, memsz = struct.unpack_from(
                "<IIQQQQQ", header, phoff + i * phentsize
            )
            if kind == _PT_LOAD and paddr <= address and address + length <= paddr + memsz:
                return int(offset + address - paddr)
        raise GuestError(f"{address:#x}+{length:#x} is not in the guest's online RAM")

    def _kcore_dd(self, address: int, length: int) -> str:
        offset = self._kcore_offset(address, length)
        return (
            f"dd if=/proc/kcore bs=1M iflag=skip_bytes,count_bytes skip={offset} "
            f"count={length} 2>/dev/null"
        )

    def read_phys(self, address: int, length: int) -> bytes:
        """``length`` bytes of guest-physical memory at ``address`` as the guest's kernel sees
        them, read in the guest from ``/proc/kcore`` (``/dev/mem`` refuses RAM: Debian's
        kernel has STRICT_DEVMEM). Online RAM only (offline memory reads as zeros). The bytes
        cross the console in base64: for small reads; compare large ranges with
        :meth:`phys_sha256`."""
        data = _unbase64(self.sh(f"{self._kcore_dd(address, length)} | base64"))
        if len(data) != length:
            raise GuestError(f"read {len(data)} bytes at {address:#x}, not {length}")
        return data

    def phys_sha256(self, address: int, length: int) -> str:
        """The SHA-256 (hex) of guest-physical ``[address, address + length)``, hashed in the
        guest (see :meth:`read_phys`)."""
        return self.sh(f"{self._kcore_dd(address, length)} | sha256sum").split()[0]

    def meminfo_kib(self, field: str = "MemTotal") -> int:
        """A ``/proc/meminfo`` field of the guest, in KiB."""
        line = self.sh(f"grep '^{field}:' /proc/meminfo")
        return int(line.split()[1])

    # -- QMP -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def qmp(self, second: bool = False) -> AsyncIterator[QMPClient]:
        """A QMP client connected to the first (or ``second``) QMP socket; disconnected
        after. Each socket serves one client at a time."""
        client = QMPClient(f"test-qmp{2 if second else 1}")
        await client.connect(str(self.qmp2_path if second else self.qmp_path))
        try:
            yield client
        finally:
            await client.disconnect()


def _unbase64(text: str) -> bytes:
    """Decode what the guest's ``base64`` printed; anything else in it is an error."""
    return base64.b64decode("".join(text.split()), validate=True)


async def hmp(client: QMPClient, command_line: str) -> str:
    """An HMP command through QMP's ``human-monitor-command``; its text output."""
    out = await client.execute("human-monitor-command", {"command-line": command_line})
    if not isinstance(out, str):
        raise TypeError(f"human-monitor-command answered {out!r}")
    return out


async def xp(client: QMPClient, address: int, length: int) -> bytes:
    """``length`` bytes of guest-physical memory at ``address``, read with HMP ``xp``."""
    text = await hmp(client, f"xp /{length}xb {address:#x}")
    data = bytes(int(b, 16) for b in re.findall(r"\b0x([0-9a-f]{2})\b", text))
    if len(data) != length:
        raise ValueError(f"xp gave {len(data)} bytes, not {length}: {text!r}")
    return data
