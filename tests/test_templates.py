"""Templates (docs/protocol.md §14): ``ram-block-seal`` on real memfds, with other real processes
mapping them writable (sealing refused), privately (clones) and read-only; the refusals of
a sealed block; its deletion whatever holds it. Real daemon, real kernel seals."""

from __future__ import annotations

import base64
import fcntl
import mmap
import os
import subprocess
import sys
from typing import Any

from daemon import Daemon, Raw, wait_job
from fdpeer import Mapper

PAGE = 4096
MiB = 1 << 20
RAMCTL = [sys.executable, "-m", "ramd_client.cli"]

#: A child that maps fd ``argv[1]`` of ``argv[2]`` bytes (``shared``: MAP_SHARED writable,
#: else MAP_PRIVATE writable), prints its first 16 bytes as hex, writes ``argv[3]`` at 0 when
#: given and prints the first 16 bytes again; then for each line on stdin prints them again;
#: exits at EOF.
CHILD = r"""
import mmap, os, sys
fd, size, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
flags = mmap.MAP_SHARED if mode == "shared" else mmap.MAP_PRIVATE
view = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
print(view[:16].hex(), flush=True)
if len(sys.argv) > 4:
    view[: len(sys.argv[4])] = sys.argv[4].encode()
print(view[:16].hex(), flush=True)
for line in sys.stdin:
    print(view[:16].hex(), flush=True)
"""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _read(rpc: Raw, block: str, offset: int, length: int) -> bytes:
    return base64.b64decode(
        rpc.call("ram-block-read", id=block, offset=offset, length=length)["data"]
    )


def _child(fd: int, size: int, mode: str, *write: str) -> subprocess.Popen[str]:
    """The :data:`CHILD` process, mapping ``fd`` (inherited)."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(fd), str(size), mode, *write],
        pass_fds=[fd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _ask(child: subprocess.Popen[str]) -> bytes:
    """What the child sees at 0 now."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    return bytes.fromhex(child.stdout.readline())


def _template(rpc: Raw, block: str, data: bytes, size: int = 16 * PAGE, **kw: Any) -> None:
    rpc.call("ram-block-add", id=block, size=size, backend="memfd", **kw)
    rpc.call("ram-block-write", id=block, offset=0, data=_b64(data))


def test_seal_is_refused_while_another_process_maps_the_block_writable(
    reused_daemon: Daemon,
) -> None:
    with Mapper(reused_daemon.path) as rpc:
        _template(rpc, "t", b"template bytes!!")
        fd, _ = rpc.get_fd("t")
        child = _child(fd, 16 * PAGE, "shared")
        os.close(fd)
        assert child.stdout is not None
        assert bytes.fromhex(child.stdout.readline()) == b"template bytes!!"
        child.stdout.readline()
        err = rpc.error("ram-block-seal", id="t")
        assert err["message"] == "RAM block 't' is mapped writable by another process"
        assert err["data"] == {"class": "GenericError"}
        # nothing changed: not sealed, and the daemon's own view is writable again
        assert rpc.call("query-ram-blocks", id="t")[0]["sealed"] is False
        rpc.call("ram-block-write", id="t", offset=0, data=_b64(b"written by ramd"))
        assert _ask(child).startswith(b"written by ramd")
        child.communicate(timeout=20)  # EOF: the child exits, its mapping goes
        info = rpc.call("ram-block-seal", id="t")
        assert info["sealed"] is True and info["id"] == "t"
        assert rpc.call("query-ram-blocks", id="t")[0]["sealed"] is True
        assert rpc.call("ram-block-seal", id="t") == info  # sealing twice: a no-op
        # the kernel holds the seals, not only the daemon
        fd, _ = rpc.get_fd("t")
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        for seal in (fcntl.F_SEAL_WRITE, fcntl.F_SEAL_GROW, fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_SEAL):
            assert seals & seal
        os.close(fd)
        rpc.call("ram-block-put-fd", id="t")
        rpc.call("ram-block-del", id="t")


def test_a_sealed_block_refuses_every_change_and_its_fds_map_privately_or_readonly(
    reused_daemon: Daemon,
) -> None:
    with Mapper(reused_daemon.path) as rpc:
        _template(rpc, "t", b"the template", **{"max-size": 64 * PAGE})
        job = rpc.call("ram-save", target={"file": "tpl-image"}, blocks=["t"])["job-id"]
        assert wait_job(rpc, job)["status"] == "concluded"
        rpc.call("job-dismiss", id=job)
        assert rpc.call("ram-block-seal", id="t")["resizable"] is True
        sealed = "RAM block 't' is sealed"
        for method, params in (
            ("ram-block-write", {"offset": 0, "data": _b64(b"x")}),
            ("ram-block-discard", {"offset": 0, "length": PAGE}),
            ("ram-block-resize", {"size": 32 * PAGE}),
            ("ram-block-resize", {"size": 8 * PAGE}),
        ):
            assert rpc.error(method, id="t", **params)["message"] == sealed, method
        job = rpc.call("ram-load", source={"file": "tpl-image"})["job-id"]
        assert sealed in str(wait_job(rpc, job)["error"])
        rpc.call("job-dismiss", id=job)
        assert rpc.call("query-ram-blocks", id="t")[0]["size"] == 16 * PAGE

        fd, _ = rpc.get_fd("t")
        try:
            mmap.mmap(fd, 16 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            raise AssertionError("a sealed memfd was mapped shared and writable")
        except PermissionError:
            pass
        with mmap.mmap(fd, 16 * PAGE, mmap.MAP_PRIVATE) as clone:
            assert clone[:12] == b"the template"
            clone[:5] = b"CLONE"  # copy-on-write: this mapping only
            assert clone[:12] == b"CLONEemplate"
        os.close(fd)
        ro, info = rpc.get_fd("t", readonly=True)
        assert info["readonly"] is True
        with mmap.mmap(ro, 16 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            assert view[:12] == b"the template"
        os.close(ro)
        assert _read(rpc, "t", 0, 12) == b"the template"
        rpc.call("ram-block-del", id="t")  # two mappers hold it: no acknowledgement waited for
        assert rpc.call("query-ram-blocks") == []


def test_only_memfd_blocks_can_be_sealed(reused_shared_daemon: Daemon) -> None:
    with Raw(reused_shared_daemon.path) as rpc:
        for backend in ("anonymous", "file"):
            rpc.call("ram-block-add", id="b", size=PAGE, backend=backend)
            err = rpc.error("ram-block-seal", id="b")
            assert err["message"] == f"RAM block 'b' is not a memfd block (backend {backend})"
            assert rpc.call("query-ram-blocks", id="b")[0]["sealed"] is False
            rpc.call("ram-block-write", id="b", offset=0, data=_b64(b"still writable"))
            rpc.call("ram-block-del", id="b")
        assert rpc.error("ram-block-seal", id="nope")["data"] == {"class": "DeviceNotFound"}


def test_deleting_a_sealed_template_leaves_running_clones_intact(
    reused_daemon: Daemon,
) -> None:
    """A clone started with ``ramctl exec`` holds a lease, and a mapper connection holds an
    fd: the sealed template is deleted at once anyway, and each clone keeps its bytes (its
    own writes included) after the daemon unmapped and closed it."""
    with Mapper(reused_daemon.path) as rpc, Raw(reused_daemon.path) as other:
        _template(rpc, "tpl", b"golden image....")
        rpc.call("ram-block-seal", id="tpl")
        child = [sys.executable, "-c", CHILD, "{fd}", str(16 * PAGE), "private", "mine"]
        clone = subprocess.Popen(
            [*RAMCTL, "--socket", str(reused_daemon.path), "exec", "--block", "tpl", "--", *child],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert clone.stdout is not None
        assert bytes.fromhex(clone.stdout.readline()) == b"golden image...."
        assert bytes.fromhex(clone.stdout.readline()) == b"mineen image...."
        rpc.get_fd("tpl")  # this connection maps it too
        info = rpc.call("query-ram-blocks", id="tpl")[0]
        assert (info["leases"], info["mappers"]) == (1, 1)
        other.call("subscribe", events=["RAM_BLOCK_REMOVED"])
        assert other.call("ram-block-del", id="tpl") == {}
        assert other.call("query-ram-blocks") == []
        # the mapper is told, with nothing to acknowledge
        rpc.call("query-version")  # events that came before its answer are kept apart
        (removed,) = rpc.events
        assert removed["method"] == "RAM_BLOCK_REMOVED"
        assert removed["params"]["data"]["ack"] is False
        assert _ask(clone) == b"mineen image...."
        clone.communicate(timeout=20)
        assert clone.returncode == 0


def test_a_template_from_a_load_into_a_fresh_memfd_block(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as rpc:
        _template(rpc, "vm", b"saved guest RAM")
        job = rpc.call("ram-save", target={"file": "tpl-load"}, blocks=["vm"])["job-id"]
        wait_job(rpc, job)
        rpc.call("job-dismiss", id=job)
        rpc.call("ram-block-del", id="vm")
        job = rpc.call("ram-load", source={"file": "tpl-load"})["job-id"]
        assert wait_job(rpc, job)["status"] == "concluded"
        rpc.call("job-dismiss", id=job)
        info = rpc.call("ram-block-seal", id="vm")
        assert (info["backend"], info["sealed"]) == ("memfd", True)
        assert _read(rpc, "vm", 0, 15) == b"saved guest RAM"
        rpc.call("ram-block-del", id="vm")
