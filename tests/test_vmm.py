"""Attachments (docs/protocol.md §13) against a real QEMU 7.2 running as another uid.

QEMU has no guest: the test plays the guest's part through QEMU's qtest socket (reading and
writing guest-physical memory, the ACPI eject of a DIMM), see :mod:`vmm_support`.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ramd_client
from client_support import WireRecorder, arguments_validator
from conftest import LOOPS
from daemon import Daemon, Raw, wait_job
from fdstore_support import FakeManager
from ramctl_support import jok, ok, ramctl
from vmm_support import DIMM_BASE, QEMU, VMM_UID, Qemu, file_acl

MiB = 1 << 20

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


@pytest.fixture
def vmm_daemon(
    request: pytest.FixtureRequest, start_daemon: Callable[..., Daemon]
) -> Iterator[Daemon]:
    """A fresh daemon with a tmpfs memory-dir (``file`` blocks) and a 2 s ack-timeout (the
    deadline of every step the VMM owes); on asyncio, or the loop given as the parameter
    (``indirect``)."""
    loop = getattr(request, "param", "asyncio")
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    try:
        config = f'memory-dir = "{parent}/mem"\n[limits]\nack-timeout = 2\n'
        yield start_daemon(config, "--event-loop", loop)
    finally:
        shutil.rmtree(parent)


@pytest.fixture
def qemu() -> Iterator[Qemu]:
    q = Qemu()
    try:
        yield q
    finally:
        q.stop()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _attach(rpc: Raw, qemu: Qemu, block: str, **kw: Any) -> Any:
    return rpc.call("ram-block-attach", id=block, qmp=str(qemu.ramd_qmp), **{"as": "pc-dimm"}, **kw)


def _events(rpc: Raw, name: str) -> list[dict[str, Any]]:
    return [e["params"]["data"] for e in rpc.events if e["method"] == name]


def _wait_event(rpc: Raw, name: str, timeout: float = 10.0) -> dict[str, Any]:
    rpc.sock.settimeout(timeout)
    while not _events(rpc, name):
        msg = rpc.line()
        assert isinstance(msg, dict) and "method" in msg, msg
        rpc.events.append(msg)
    return _events(rpc, name)[0]


@pytest.mark.parametrize("vmm_daemon", LOOPS, indirect=True)
@pytest.mark.parametrize("backend", ["file", "memfd"])
def test_qemu_as_another_uid_reads_and_writes_an_attached_block(
    vmm_daemon: Daemon, qemu: Qemu, backend: str
) -> None:
    assert qemu.uid() == VMM_UID != os.getuid()
    with Raw(vmm_daemon.path) as rpc:
        rpc.call("subscribe", events=["RAM_BLOCK_ATTACHED"])
        info = rpc.call("ram-block-add", id="vm1", size=64 * MiB, backend=backend)
        rpc.call("ram-block-write", id="vm1", offset=4096, data=_b64(b"written by ramd"))
        info = _attach(rpc, qemu, "vm1")
        att = info["attachment"]
        assert att == {
            "qmp": str(qemu.ramd_qmp),
            "as": "pc-dimm",
            "device": "ramd-vm1",
            "memdev": "/objects/ramd-mem-vm1",
            "addr": DIMM_BASE,
            "vmm-pid": qemu.pid,
        }
        assert _events(rpc, "RAM_BLOCK_ATTACHED") == [
            {
                "seq": 2,
                "id": "vm1",
                "device": "ramd-vm1",
                "as": "pc-dimm",
                "addr": DIMM_BASE,
                "vmm-pid": qemu.pid,
            }
        ]
        # QEMU's view: one DIMM of the block's size on the backend ramd named, the fd in a set
        (dimm,) = qemu.cmd("query-memory-devices")
        assert dimm["data"]["memdev"] == "/objects/ramd-mem-vm1"
        assert dimm["data"]["size"] == 64 * MiB
        assert qemu.fdsets()[0]["fds"][0]["opaque"] == "ramd:vm1"
        # ramd -> guest: HMP xp reads what ram-block-write wrote
        assert qemu.xp(att["addr"] + 4096, 15) == b"written by ramd"
        # guest -> ramd: a guest-physical write (qtest) is what ram-block-read returns
        qemu.write_phys(att["addr"] + 64 * MiB - 8, b"by guest")
        got = rpc.call("ram-block-read", id="vm1", offset=64 * MiB - 8, length=8)
        assert base64.b64decode(got["data"]) == b"by guest"
        assert rpc.call("query-ram-blocks", id="vm1")[0]["attachment"] == att
        if backend == "file":  # mode 0600, so QEMU's uid could only open it by the grant
            path = info["path"]
            assert os.stat(path).st_mode & 0o777 != 0o777
            assert file_acl(path) is not None


def test_resize_and_del_of_an_attached_block_are_refused(vmm_daemon: Daemon, qemu: Qemu) -> None:
    with Raw(vmm_daemon.path) as rpc:
        rpc.call(
            "ram-block-add", id="vm1", size=32 * MiB, **{"max-size": 256 * MiB}, backend="memfd"
        )
        _attach(rpc, qemu, "vm1")
        for size in (16 * MiB, 64 * MiB):
            err = rpc.error("ram-block-resize", id="vm1", size=size)
            assert err["message"] == "RAM block 'vm1' is attached as pc-dimm: its size is fixed"
        for mode in ("safe", "hard"):
            err = rpc.error("ram-block-del", id="vm1", mode=mode)
            assert err["message"] == (
                f"RAM block 'vm1' is attached to VMM {qemu.pid} as ramd-vm1: detach it first"
            )
        info = rpc.call("query-ram-blocks", id="vm1")[0]
        assert info["size"] == 32 * MiB
        # the attachment is a lease of kind vmm (docs/protocol.md §12)
        assert info["leases"] == 1 and [(h["kind"], h["pid"]) for h in info["holders"]] == [
            ("vmm", qemu.pid)
        ]
        qemu.write_phys(DIMM_BASE + 32 * MiB - 4, b"tail")  # the whole DIMM is still there
        assert qemu.xp(DIMM_BASE + 32 * MiB - 4, 4) == b"tail"
        assert qemu.alive() and qemu.cmd("query-status")["status"] == "running"


def test_detach_with_no_guest_to_eject_times_out_and_changes_nothing(
    vmm_daemon: Daemon, qemu: Qemu
) -> None:
    with Raw(vmm_daemon.path) as rpc:
        info = rpc.call("ram-block-add", id="vm1", size=16 * MiB, backend="file")
        att = _attach(rpc, qemu, "vm1")["attachment"]
        err = rpc.error("ram-block-detach", id="vm1", timeout=0.5)
        assert err["message"] == "Timed out waiting for the VMM to release RAM block 'vm1'"
        assert rpc.call("query-ram-blocks", id="vm1")[0]["attachment"] == att
        assert "ramd-mem-vm1" in qemu.objects()
        assert [f["opaque"] for s in qemu.fdsets() for f in s["fds"]] == ["ramd:vm1"]
        assert file_acl(info["path"]) is not None
        assert "RAM block 'vm1' is attached" in rpc.error("ram-block-del", id="vm1")["message"]
        # the guest lets go later: a repeated detach then completes
        qemu.eject_dimm(0)
        rpc.call("subscribe", events=["RAM_BLOCK_DETACHED"])
        assert rpc.call("ram-block-detach", id="vm1", timeout=5) == {}
        assert _events(rpc, "RAM_BLOCK_DETACHED") == [
            {"seq": 3, "id": "vm1", "device": "ramd-vm1", "reason": "detached"}
        ]


def test_detach_after_the_guest_ejects_leaves_nothing_in_qemu(
    vmm_daemon: Daemon, qemu: Qemu
) -> None:
    with Raw(vmm_daemon.path) as rpc:
        info = rpc.call("ram-block-add", id="vm1", size=16 * MiB, backend="file")
        _attach(rpc, qemu, "vm1")
        # the guest ejects as soon as it is asked (the eject is queued behind device_del)
        timer = threading.Timer(0.3, qemu.eject_dimm, (0,))
        timer.start()
        try:
            assert rpc.call("ram-block-detach", id="vm1", timeout=10) == {}
        finally:
            timer.join()
        assert "attachment" not in rpc.call("query-ram-blocks", id="vm1")[0]
        assert qemu.cmd("query-memory-devices") == []
        assert "ramd-mem-vm1" not in qemu.objects()
        assert qemu.fdsets() == []
        assert file_acl(info["path"]) is None  # access is the daemon's alone again
        rpc.call("ram-block-resize", id="vm1", size=16 * MiB)
        assert rpc.call("ram-block-del", id="vm1") == {}


@pytest.mark.parametrize("vmm_daemon", LOOPS, indirect=True)
def test_killing_qemu_ends_the_attachment(vmm_daemon: Daemon, qemu: Qemu) -> None:
    with Raw(vmm_daemon.path) as rpc:
        info = rpc.call("ram-block-add", id="vm1", size=16 * MiB, backend="file")
        _attach(rpc, qemu, "vm1")
        rpc.call("subscribe", events=["RAM_BLOCK_DETACHED"])
        qemu.kill()
        event = _wait_event(rpc, "RAM_BLOCK_DETACHED")
        assert event == {"seq": 3, "id": "vm1", "device": "ramd-vm1", "reason": "vmm-exited"}
        assert "attachment" not in rpc.call("query-ram-blocks", id="vm1")[0]
        assert file_acl(info["path"]) is None
        assert rpc.call("ram-block-del", id="vm1") == {}


def test_a_failed_device_add_leaves_nothing_behind(vmm_daemon: Daemon, qemu: Qemu) -> None:
    with Raw(vmm_daemon.path) as rpc:
        info = rpc.call("ram-block-add", id="vm1", size=16 * MiB, backend="file")
        err = _attach_error(rpc, qemu, "vm1", bus="nosuchbus")
        assert err["message"] == (
            "VMM refused attaching RAM block 'vm1': Bus 'nosuchbus' not found"
        )
        assert err["data"] == {"class": "GenericError"}
        assert "ramd-mem-vm1" not in qemu.objects()
        assert qemu.fdsets() == []
        assert qemu.cmd("query-memory-devices") == []
        assert file_acl(info["path"]) is None
        assert "attachment" not in rpc.call("query-ram-blocks", id="vm1")[0]
        # a device id QEMU already has fails at device_add too, and is undone as well
        qemu.cmd("object-add", **{"qom-type": "memory-backend-ram", "id": "m0", "size": 2 * MiB})
        qemu.cmd("device_add", driver="pc-dimm", id="taken", memdev="m0")
        err = _attach_error(rpc, qemu, "vm1", device="taken")
        assert err["message"].startswith("VMM refused attaching RAM block 'vm1': ")
        assert "ramd-mem-vm1" not in qemu.objects() and qemu.fdsets() == []
        # and the block can still be attached afterwards
        assert _attach(rpc, qemu, "vm1")["attachment"]["device"] == "ramd-vm1"


def _attach_error(rpc: Raw, qemu: Qemu, block: str, **kw: Any) -> dict[str, Any]:
    return rpc.error(
        "ram-block-attach", id=block, qmp=str(qemu.ramd_qmp), **{"as": "pc-dimm"}, **kw
    )


def test_one_vmm_per_block_and_shared_blocks_only(vmm_daemon: Daemon, qemu: Qemu) -> None:
    with Raw(vmm_daemon.path) as rpc:
        rpc.call("ram-block-add", id="vm1", size=16 * MiB, backend="memfd")
        rpc.call("ram-block-add", id="anon", size=16 * MiB)
        _attach(rpc, qemu, "vm1")
        err = _attach_error(rpc, qemu, "vm1", device="other")
        assert err["message"] == (
            f"RAM block 'vm1' is already attached to VMM {qemu.pid} as ramd-vm1"
        )
        err = _attach_error(rpc, qemu, "anon")
        assert err["message"].startswith("RAM block 'anon' is not shared (backend anonymous)")
        assert len(qemu.cmd("query-memory-devices")) == 1


def test_an_unreachable_or_silent_vmm_is_an_error_and_stalls_nothing(
    vmm_daemon: Daemon, tmp_path: Path
) -> None:
    missing = tmp_path / "nothing.qmp"
    silent = tmp_path / "silent.qmp"
    with socket.socket(socket.AF_UNIX) as listener, Raw(vmm_daemon.path) as rpc:
        listener.bind(str(silent))
        listener.listen(4)  # accepts at the kernel level, never greets
        rpc.call("ram-block-add", id="vm1", size=MiB, backend="memfd")
        err = rpc.error("ram-block-attach", id="vm1", qmp=str(missing), **{"as": "pc-dimm"})
        assert err["message"] == (
            f"Cannot connect to VMM QMP socket '{missing}': No such file or directory"
        )
        # while the daemon waits for the silent VMM's greeting, others are served
        other = Raw(vmm_daemon.path)
        rpc.send(
            b'{"jsonrpc":"2.0","id":99,"method":"ram-block-attach","params":{"id":"vm1",'
            b'"qmp":"%s","as":"pc-dimm"}}' % str(silent).encode()
        )
        time.sleep(0.2)
        assert other.call("query-ram-blocks", id="vm1")[0]["id"] == "vm1"
        busy = other.error("ram-block-resize", id="vm1", size=2 * MiB)
        assert busy["message"] == "RAM block 'vm1' is busy: it is being attached to a VMM"
        other.close()
        err = rpc.reply()["error"]
        assert err["message"] == (
            f"Cannot connect to VMM QMP socket '{silent}': Connection timed out"
        )
        assert "attachment" not in rpc.call("query-ram-blocks", id="vm1")[0]


async def test_the_clients_attach_requests_validate(vmm_daemon: Daemon, qemu: Qemu) -> None:
    """The typed client's attach and detach: their requests, answers and events fit the
    schema (see tests/test_schemas.py)."""
    wire = WireRecorder()
    async with await ramd_client.connect(vmm_daemon.path, trace=wire.trace()) as c:
        await c.ram_block_add("vm1", 16 * MiB, backend="memfd")
        async with c.events(["RAM_BLOCK_ATTACHED", "RAM_BLOCK_DETACHED"], replay=False) as ev:
            info = await c.ram_block_attach("vm1", str(qemu.ramd_qmp), "pc-dimm", device="d1")
            assert info.attachment is not None and info.attachment.device == "d1"
            assert (await anext(ev)).data.model_dump(by_alias=True)["vmm-pid"] == qemu.pid
            with pytest.raises(ramd_client.RamdError, match="Timed out waiting for the VMM"):
                await c.ram_block_detach("vm1", timeout=0.2)
            qemu.eject_dimm(0)
            await c.ram_block_detach("vm1", timeout=5)
            assert (await anext(ev)).data.model_dump(by_alias=True)["reason"] == "detached"
    methods = {method for method, _ in wire.requests()}
    assert {"ram-block-attach", "ram-block-detach"} <= methods
    for method, params in wire.requests():
        assert not list(arguments_validator(method).iter_errors(params)), (method, params)
    wire.check()


def test_ramctl_attach_and_detach(vmm_daemon: Daemon, qemu: Qemu) -> None:
    sock = vmm_daemon.path
    ok(sock, "add", "vm1", "16M", "--backend", "memfd")
    out = ok(sock, "attach", "vm1", "--qmp", str(qemu.ramd_qmp), "--as", "pc-dimm")
    assert out == f"vm1: pc-dimm ramd-vm1 at 0x{DIMM_BASE:x} in VMM pid {qemu.pid}\n"
    assert jok(sock, "info", "vm1")["attachment"]["vmm-pid"] == qemu.pid
    p = ramctl(sock, "detach", "vm1", "--timeout", "0.3")
    assert p.returncode == 1
    assert b"Timed out waiting for the VMM to release RAM block 'vm1'" in p.stderr
    qemu.eject_dimm(0)
    assert ok(sock, "detach", "vm1") == ""
    assert "attachment" not in jok(sock, "info", "vm1")
    p = ramctl(sock, "attach", "vm1", "--qmp", str(qemu.ramd_qmp), "--as", "pc-dimm",
               "--bus", "nosuchbus")  # fmt: skip
    assert p.returncode == 1 and b"Bus 'nosuchbus' not found" in p.stderr


def test_a_stalled_vmm_times_out_stalls_nothing_and_is_cleaned_up_later(
    vmm_daemon: Daemon, qemu: Qemu
) -> None:
    with Raw(vmm_daemon.path) as rpc, Raw(vmm_daemon.path) as other:
        rpc.call("ram-block-add", id="vm1", size=16 * MiB, backend="memfd")
        rpc.call("ram-block-add", id="vm2", size=16 * MiB, backend="file")
        _attach(rpc, qemu, "vm1")  # the daemon's QMP session is open now
        os.kill(qemu.pid, signal.SIGSTOP)
        try:
            rpc.send(
                b'{"jsonrpc":"2.0","id":99,"method":"ram-block-attach","params":{"id":"vm2",'
                b'"qmp":"%s","as":"pc-dimm"}}' % str(qemu.ramd_qmp).encode()
            )
            time.sleep(0.3)
            assert other.call("query-ram-blocks", id="vm1")[0]["attachment"]["device"]
            err = rpc.reply()["error"]
            assert err["message"] == (
                f"Cannot attach RAM block 'vm2' to the VMM at '{qemu.ramd_qmp}':"
                " no answer to add-fd within 2 s"
            )
            busy = rpc.error(
                "ram-block-attach", id="vm2", qmp=str(qemu.ramd_qmp), **{"as": "pc-dimm"}
            )
            assert busy["message"] == "RAM block 'vm2' is busy: undoing a failed attach in a VMM"
        finally:
            os.kill(qemu.pid, signal.SIGCONT)
        # QEMU runs the late add-fd once it wakes up, and the background undo after it; a
        # new attach is refused until that is over (this one fails at device_add, undone)
        deadline = time.monotonic() + 20
        while True:
            err = _attach_error(rpc, qemu, "vm2", bus="nosuchbus")
            if "nosuchbus" in err["message"]:
                break
            assert "undoing a failed attach" in err["message"], err
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "ramd-mem-vm2" not in qemu.objects()
        assert [f["opaque"] for s in qemu.fdsets() for f in s["fds"]] == ["ramd:vm1"]
        addr = _attach(rpc, qemu, "vm2")["attachment"]["addr"]
        assert addr == DIMM_BASE + 16 * MiB


def test_a_load_that_would_resize_an_attached_dimm_fails_and_changes_nothing(
    vmm_daemon: Daemon, qemu: Qemu
) -> None:
    with Raw(vmm_daemon.path) as rpc:
        rpc.call(
            "ram-block-add", id="vm1", size=16 * MiB, **{"max-size": 64 * MiB}, backend="memfd"
        )
        rpc.call("ram-block-write", id="vm1", offset=0, data=_b64(b"before"))
        rpc.call("ram-block-resize", id="vm1", size=32 * MiB)
        wait_job(rpc, rpc.call("ram-save", target={"file": "img"})["job-id"])
        rpc.call("ram-block-resize", id="vm1", size=16 * MiB)
        _attach(rpc, qemu, "vm1")
        job = wait_job(rpc, rpc.call("ram-load", source={"file": "img"})["job-id"])
        assert job["error"] == "RAM block 'vm1' is attached as pc-dimm: its size is fixed"
        assert rpc.call("query-ram-blocks", id="vm1")[0]["size"] == 16 * MiB
        assert qemu.xp(DIMM_BASE, 6) == b"before"


def _fake_vmm(path: Path, script: Callable[[socket.socket], None]) -> threading.Thread:
    """A hostile "VMM" on ``path``: accepts one connection and runs ``script`` on it."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                script(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


GREETING = (
    b'{"QMP":{"version":{"qemu":{"major":7,"minor":2,"micro":0},"package":""},'
    b'"capabilities":[]}}\r\n'
)


def _negotiate(conn: socket.socket) -> None:
    conn.sendall(GREETING)
    request = conn.recv(4096)
    assert b"qmp_capabilities" in request
    ident = request.split(b'"id": ')[1].split(b"}")[0] if b'"id"' in request else b'""'
    conn.sendall(b'{"return": {}, "id": %s}\r\n' % ident)


def test_a_vmm_sending_too_much_is_cut_off(vmm_daemon: Daemon, tmp_path: Path) -> None:
    """A greeting longer than the daemon takes from a VMM ends that connection at once; a
    VMM flooding events while the daemon waits for an answer costs other clients nothing."""
    huge = tmp_path / "huge.qmp"
    flood = tmp_path / "flood.qmp"
    sent = [0]
    cut_off = threading.Event()

    def greet_forever(conn: socket.socket) -> None:
        try:
            conn.sendall(b'{"QMP": "' + b"x" * (4 << 20))  # no end: longer than any message
        except (BrokenPipeError, ConnectionResetError):
            cut_off.set()

    def flood_events(conn: socket.socket) -> None:
        _negotiate(conn)
        event = (
            b'{"event": "RTC_CHANGE", "data": {"offset": 0},'
            b' "timestamp": {"seconds": 1, "microseconds": 0}}\r\n'
        )
        batch = event * 1000
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline:
                conn.sendall(batch)
                sent[0] += 1000
        except OSError:
            pass

    with Raw(vmm_daemon.path) as rpc, Raw(vmm_daemon.path) as other:
        rpc.call("ram-block-add", id="vm1", size=MiB, backend="memfd")
        _fake_vmm(huge, greet_forever)
        err = rpc.error("ram-block-attach", id="vm1", qmp=str(huge), **{"as": "pc-dimm"})
        assert err["message"].startswith(f"Cannot connect to VMM QMP socket '{huge}': ")
        assert cut_off.wait(10)  # the daemon closed the connection before 4 MiB were read
        thread = _fake_vmm(flood, flood_events)
        rpc.send(
            b'{"jsonrpc":"2.0","id":99,"method":"ram-block-attach","params":{"id":"vm1",'
            b'"qmp":"%s","as":"pc-dimm"}}' % str(flood).encode()
        )
        for _ in range(20):  # served throughout the flood
            assert other.call("query-version")["package"].startswith("ramd ")
            time.sleep(0.05)
        err = rpc.reply()["error"]  # the flood never answers add-fd
        assert err["message"] == (
            f"Cannot attach RAM block 'vm1' to the VMM at '{flood}': no answer to add-fd within 2 s"
        )
        thread.join(10)
        assert sent[0] > 10_000  # the daemon read (and dropped) what the VMM sent
        assert vmm_daemon.rss() < 200 * MiB


# -- virtio-mem without a guest (the guest's part: tests/test_virtio_mem.py) ---------------------


def _attach_vmem(rpc: Raw, qemu: Qemu, block: str, **kw: Any) -> Any:
    return rpc.call(
        "ram-block-attach", id=block, qmp=str(qemu.ramd_qmp), **{"as": "virtio-mem"}, **kw
    )


def _resized(rpc: Raw) -> list[tuple[int, int, bool]]:
    return [(e["old-size"], e["new-size"], e["ack"]) for e in _events(rpc, "RAM_BLOCK_RESIZED")]


def _file_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


@pytest.mark.parametrize("vmm_daemon", LOOPS, indirect=True)
def test_virtio_mem_resize_is_a_request_and_the_size_is_what_qemu_reports(
    vmm_daemon: Daemon, qemu: Qemu
) -> None:
    """No guest plugs anything: the block's size is QEMU's plugged size (0) from the attach
    on, its file max-size long and sparse (QEMU discarded the old contents); resizes set
    QEMU's requested-size (0 included), sizes QEMU refuses change nothing, and
    max(size, requested-size) is what the block counts as used. When QEMU exits, the
    daemon sizes the block again: its file shortened to its size, grown as any block."""
    with Raw(vmm_daemon.path) as rpc:
        rpc.call("subscribe", events=["RAM_BLOCK_RESIZED", "RAM_BLOCK_DETACHED"], replay=False)
        info = rpc.call(
            "ram-block-add", id="vm1", size=8 * MiB, **{"max-size": 64 * MiB}, backend="file"
        )
        path = info["path"]
        rpc.call("ram-block-write", id="vm1", offset=0, data=_b64(os.urandom(MiB)))
        info = _attach_vmem(rpc, qemu, "vm1")
        (dev,) = qemu.cmd("query-memory-devices")
        assert dev["type"] == "virtio-mem"
        assert info["size"] == 0 and info["attachment"] == {
            "qmp": str(qemu.ramd_qmp),
            "as": "virtio-mem",
            "device": "ramd-vm1",
            "memdev": "/objects/ramd-mem-vm1",
            "addr": dev["data"]["memaddr"],
            "vmm-pid": qemu.pid,
            "requested-size": 8 * MiB,
        }
        assert (dev["data"]["requested-size"], dev["data"]["max-size"]) == (8 * MiB, 64 * MiB)
        assert _resized(rpc) == [(8 * MiB, 0, False)]
        assert _file_of(path) == (64 * MiB, 0)
        assert rpc.call("query-stats")["used"] == 8 * MiB
        assert info["leases"] == 1 and file_acl(path) is not None

        err = rpc.error("ram-block-resize", id="vm1", size=3 * MiB)
        assert err["message"] == (
            "VMM refused resizing RAM block 'vm1': 'requested-size' has to be multiples of"
            " 'block-size' (0x200000)"
        )
        err = rpc.error("ram-block-resize", id="vm1", size=128 * MiB)
        assert err["message"] == "Size too large: vm1: 0x8000000 > 0x4000000: Invalid argument"
        assert qemu.cmd("query-memory-devices")[0]["data"]["requested-size"] == 8 * MiB
        for size in (0, 32 * MiB):
            info = rpc.call("ram-block-resize", id="vm1", size=size)
            assert (info["size"], info["attachment"]["requested-size"]) == (0, size)
            assert qemu.cmd("query-memory-devices")[0]["data"]["requested-size"] == size
            assert rpc.call("query-stats")["used"] == size
        assert len(_resized(rpc)) == 1
        err = rpc.error("ram-block-read", id="vm1", offset=0, length=1)
        assert "exceeds size 0x0" in err["message"]
        err = rpc.error("ram-block-del", id="vm1")
        assert err["message"] == (
            f"RAM block 'vm1' is attached to VMM {qemu.pid} as ramd-vm1: detach it first"
        )

        qemu.kill()
        assert _wait_event(rpc, "RAM_BLOCK_DETACHED")["reason"] == "vmm-exited"
        info = rpc.call("query-ram-blocks", id="vm1")[0]
        assert (info["size"], info["leases"], "attachment" in info) == (0, 0, False)
        assert _file_of(path) == (0, 0) and file_acl(path) is None
        assert rpc.call("query-stats")["used"] == 0
        assert rpc.call("ram-block-resize", id="vm1", size=4 * MiB)["size"] == 4 * MiB
        assert _file_of(path) == (4 * MiB, 4 * MiB)


def test_virtio_mem_counts_the_requested_size_against_max_used(
    start_daemon: Callable[..., Daemon], qemu: Qemu
) -> None:
    d = start_daemon('[limits]\nack-timeout = 2\nmax-used = "40M"\n')
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="vm1", size=8 * MiB, **{"max-size": 64 * MiB}, backend="memfd")
        err = rpc.error(
            "ram-block-attach", id="vm1", qmp=str(qemu.ramd_qmp), **{"as": "virtio-mem"},
            **{"requested-size": 48 * MiB},
        )  # fmt: skip
        assert err["message"].startswith("Limit exceeded: max-used")
        assert qemu.cmd("query-memory-devices") == []
        _attach_vmem(rpc, qemu, "vm1", **{"requested-size": 32 * MiB})
        assert rpc.call("query-stats")["used"] == 32 * MiB
        err = rpc.error("ram-block-resize", id="vm1", size=48 * MiB)
        assert err["message"].startswith("Limit exceeded: max-used")
        assert qemu.cmd("query-memory-devices")[0]["data"]["requested-size"] == 32 * MiB
        rpc.call("ram-block-add", id="other", size=8 * MiB)
        assert rpc.error("ram-block-add", id="more", size=MiB)["message"].startswith(
            "Limit exceeded: max-used"
        )


def test_virtio_mem_needs_a_resizable_shared_block(vmm_daemon: Daemon, qemu: Qemu) -> None:
    with Raw(vmm_daemon.path) as rpc:
        rpc.call("ram-block-add", id="fixed", size=16 * MiB, backend="memfd")
        rpc.call("ram-block-add", id="anon", size=16 * MiB, **{"max-size": 64 * MiB})
        err = rpc.error(
            "ram-block-attach", id="fixed", qmp=str(qemu.ramd_qmp), **{"as": "virtio-mem"}
        )
        assert err["message"] == (
            "Cannot attach RAM block 'fixed' as virtio-mem: it is not resizable (the guest"
            " plugs up to max-size: add the block with max-size)"
        )
        err = rpc.error(
            "ram-block-attach", id="anon", qmp=str(qemu.ramd_qmp), **{"as": "virtio-mem"}
        )
        assert err["message"].startswith("RAM block 'anon' is not shared (backend anonymous)")
        assert qemu.cmd("query-memory-devices") == [] and qemu.fdsets() == []
        assert "ramd-mem-fixed" not in qemu.objects()


def test_virtio_mem_detach_leaves_qemu_the_empty_device_until_it_exits(
    vmm_daemon: Daemon, qemu: Qemu
) -> None:
    """QEMU 7.2 cannot unplug a virtio-mem device: detach (nothing plugged) ends the
    attachment and its lease, the file stays max-size long while QEMU maps it, and the
    block's size is fixed until QEMU exits; then the daemon sizes it again."""
    with Raw(vmm_daemon.path) as rpc:
        rpc.call("subscribe", events=["RAM_BLOCK_DETACHED"], replay=False)
        info = rpc.call(
            "ram-block-add", id="vm1", size=8 * MiB, **{"max-size": 64 * MiB}, backend="file"
        )
        path = info["path"]
        _attach_vmem(rpc, qemu, "vm1")
        assert rpc.call("ram-block-detach", id="vm1") == {}
        assert _events(rpc, "RAM_BLOCK_DETACHED")[0]["reason"] == "detached"
        assert qemu.cmd("query-memory-devices")[0]["data"]["requested-size"] == 0
        info = rpc.call("query-ram-blocks", id="vm1")[0]
        assert (info["size"], info["leases"], "attachment" in info) == (0, 0, False)
        assert _file_of(path)[0] == 64 * MiB and file_acl(path) is None
        stuck = (
            f"RAM block 'vm1' is still mapped by VMM {qemu.pid}, which cannot unplug its"
            " virtio-mem device ramd-vm1: its size is fixed until the VMM exits"
        )
        assert rpc.error("ram-block-resize", id="vm1", size=4 * MiB)["message"] == stuck
        assert (
            rpc.error("ram-block-attach", id="vm1", qmp=str(qemu.ramd_qmp), **{"as": "virtio-mem"})[
                "message"
            ]
            == stuck
        )
        qemu.kill()
        deadline = time.monotonic() + 10
        while "error" in rpc.request("ram-block-resize", id="vm1", size=4 * MiB):
            assert time.monotonic() < deadline, "the daemon did not see QEMU exit"
            time.sleep(0.05)
        assert _file_of(path) == (4 * MiB, 4 * MiB)


def test_a_failed_virtio_mem_attach_leaves_the_block_as_it_was(
    vmm_daemon: Daemon, qemu: Qemu
) -> None:
    """device_add fails: the backend and the fd are deleted in QEMU, then the block's file
    is its size again, with its contents, and the block resizes as before."""
    with Raw(vmm_daemon.path) as rpc:
        info = rpc.call(
            "ram-block-add", id="vm1", size=8 * MiB, **{"max-size": 64 * MiB}, backend="file"
        )
        data = os.urandom(8 * MiB)
        for offset in range(0, 8 * MiB, MiB):
            rpc.call(
                "ram-block-write", id="vm1", offset=offset, data=_b64(data[offset : offset + MiB])
            )
        err = rpc.error(
            "ram-block-attach", id="vm1", qmp=str(qemu.ramd_qmp), **{"as": "virtio-mem"},
            bus="nosuchbus",
        )  # fmt: skip
        assert err["message"] == "VMM refused attaching RAM block 'vm1': Bus 'nosuchbus' not found"
        assert "ramd-mem-vm1" not in qemu.objects() and qemu.fdsets() == []
        assert _file_of(info["path"]) == (8 * MiB, 8 * MiB) and file_acl(info["path"]) is None
        info = rpc.call("query-ram-blocks", id="vm1")[0]
        assert (info["size"], info["leases"], "attachment" in info) == (8 * MiB, 0, False)
        got = rpc.call("ram-block-read", id="vm1", offset=7 * MiB, length=MiB)["data"]
        assert base64.b64decode(got) == data[7 * MiB :]
        assert rpc.call("query-stats")["used"] == 8 * MiB
        assert rpc.call("ram-block-resize", id="vm1", size=16 * MiB)["size"] == 16 * MiB
        assert _file_of(info["path"])[0] == 16 * MiB


@pytest.mark.parametrize("qemu_meanwhile", ["runs", "exits"])
def test_an_attachment_is_resumed_after_a_ramd_restart(
    start_daemon: Callable[..., Daemon], qemu: Qemu, qemu_meanwhile: str
) -> None:
    """A ``file`` block attached as a DIMM stays attached across a restart of ramd (SIGTERM,
    then a new daemon on the same memory-dir adopts the block and resumes the attachment from
    its record); killing QEMU then ends it. A QEMU that exited while ramd was down: the
    attachment ends at start (``vmm-exited``), its record with it."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    try:
        config = f'memory-dir = "{parent}/mem"\n[limits]\nack-timeout = 2\n'
        d = start_daemon(config)
        with Raw(d.path) as rpc:
            info = rpc.call(
                "ram-block-add", id="vm1", size=16 * MiB, backend="file", **{"max-size": 64 * MiB}
            )
            rpc.call("ram-block-write", id="vm1", offset=0, data=_b64(b"kept"))
            att = _attach(rpc, qemu, "vm1")["attachment"]
        record = parent / "mem" / ".vm1.vmm"
        assert record.exists()
        assert d.stop() == 0
        if qemu_meanwhile == "exits":
            qemu.kill()
        d = start_daemon(config)
        with Raw(d.path) as rpc:
            rpc.call("subscribe", events=["RAM_BLOCK_DETACHED"])
            now = rpc.call("query-ram-blocks", id="vm1")[0]
            if qemu_meanwhile == "exits":
                assert "attachment" not in now and not record.exists()
                assert file_acl(info["path"]) is None
                assert rpc.call("ram-block-del", id="vm1") == {}
                return
            assert now["attachment"] == att
            assert [(h["kind"], h["pid"]) for h in now["holders"]] == [("vmm", qemu.pid)]
            assert file_acl(info["path"]) is not None
            err = rpc.error("ram-block-resize", id="vm1", size=32 * MiB)
            assert err["message"] == "RAM block 'vm1' is attached as pc-dimm: its size is fixed"
            err = rpc.error("ram-block-del", id="vm1")
            assert err["message"] == (
                f"RAM block 'vm1' is attached to VMM {qemu.pid} as ramd-vm1: detach it first"
            )
            assert qemu.xp(DIMM_BASE, 4) == b"kept"
            qemu.kill()
            event = _wait_event(rpc, "RAM_BLOCK_DETACHED")
            assert (event["id"], event["reason"]) == ("vm1", "vmm-exited")
            assert "attachment" not in rpc.call("query-ram-blocks", id="vm1")[0]
            assert not record.exists() and file_acl(info["path"]) is None
            assert rpc.call("ram-block-del", id="vm1") == {}
    finally:
        shutil.rmtree(parent)


def test_a_memfd_blocks_attachment_is_resumed_through_the_fd_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qemu: Qemu
) -> None:
    """A ``memfd`` block's attachment is recorded in the fd store (an entry named
    ``vmm,ID,DEVICE,KIND,PID,FDSET,FD,QMP``) beside the block; the next daemon, given both
    back, resumes it, and the record goes when the attachment ends."""
    manager = FakeManager(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(manager.path))
    try:
        d = manager.start(tmp_path / "1")
        with Raw(d.path) as rpc:
            rpc.call(
                "ram-block-add", id="vm1", size=16 * MiB, backend="memfd", **{"max-size": 64 * MiB}
            )
            rpc.call("ram-block-write", id="vm1", offset=0, data=_b64(b"kept"))
            att = _attach(rpc, qemu, "vm1")["attachment"]
        assert d.stop() == 0
        manager.drain()
        (record,) = [n for n in manager.stored if n.startswith("vmm,")]
        assert record.startswith(f"vmm,vm1,ramd-vm1,pc-dimm,{qemu.pid},")
        assert record.endswith(f",{qemu.ramd_qmp}")
        d = manager.start(tmp_path / "2")
        try:
            with Raw(d.path) as rpc:
                rpc.call("subscribe", events=["RAM_BLOCK_DETACHED"])
                now = rpc.call("query-ram-blocks", id="vm1")[0]
                assert now["attachment"] == att
                assert [(h["kind"], h["pid"]) for h in now["holders"]] == [("vmm", qemu.pid)]
                err = rpc.error("ram-block-resize", id="vm1", size=32 * MiB)
                assert err["message"] == "RAM block 'vm1' is attached as pc-dimm: its size is fixed"
                assert "detach it first" in rpc.error("ram-block-del", id="vm1")["message"]
                assert qemu.xp(DIMM_BASE, 4) == b"kept"
                qemu.kill()
                assert _wait_event(rpc, "RAM_BLOCK_DETACHED")["reason"] == "vmm-exited"
                assert "attachment" not in rpc.call("query-ram-blocks", id="vm1")[0]
        finally:
            assert d.stop() == 0
        manager.drain()
        assert [n for n in manager.stored if n.startswith("vmm,")] == []
        assert list(manager.stored) == ["ram.4000000.-.vm1"]
    finally:
        manager.close()
