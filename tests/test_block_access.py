"""Who may open a shared block's file (docs/protocol.md §8): block files are 0600, and a peer of
another uid may reopen ``/proc/self/fd/N`` only as its fd allows, only while it holds the
block. Real daemon, real peers of other uids (forked children that drop to them), real
mappings in child processes (so a SIGBUS is seen as the child's death)."""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw
from test_shared_fds import Mapper

from ramd.hostmem import acl

PAGE = 4096
PAGES = 64
SIZE = PAGES * PAGE
FULL_UID = 4242
RO_UID = 4243

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run peers of other uids")


@pytest.fixture(params=["memfd", "file"])
def daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A daemon whose socket other uids can reach (uid 4242 full, 4243 read-only), with one
    shared block ``m`` of the parametrised backend."""
    top = Path(tempfile.mkdtemp(prefix="ramd-access-"))
    os.chmod(top, 0o755)
    memory_dir = Path(tempfile.mkdtemp(prefix="ramd-access-", dir="/dev/shm"))
    cfg = (
        f'socket-mode = "0666"\nallow-uids = [0, {FULL_UID}]\nreadonly-uids = [{RO_UID}]\n'
        f'memory-dir = "{memory_dir}/mem"\n'
        f'[[block]]\nid = "m"\nsize = {SIZE}\nbackend = "{request.param}"\n'
    )
    d = Daemon(top, cfg)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(top)
        shutil.rmtree(memory_dir)


def _as_uid(uid: int, body: Callable[[], Any]) -> Any:
    """Run ``body`` in a forked child that dropped to ``uid``; its JSON result (or the
    text of what it raised)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out: Any = body()
        except BaseException as e:  # reported to the test, which fails on it
            out = f"child failed: {e!r}"
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


def _try(call: Callable[[], Any]) -> str:
    """``"ok"`` or the errno name of the ``OSError`` ``call`` raised (closing an fd it
    returned)."""
    try:
        result = call()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    if isinstance(result, int):
        os.close(result)
    return "ok"


def _reopen(fd: int, flags: int) -> str:
    return _try(lambda: os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC))


def _block_fd(d: Daemon) -> tuple[Mapper, int]:
    """A root connection holding a read-write fd of ``m`` (root needs no grant)."""
    m = Mapper(d.path)
    fd, _ = m.get_fd("m")
    return m, fd


def test_block_files_are_0600_with_no_acl_entries(daemon: Daemon) -> None:
    m, fd = _block_fd(daemon)
    try:
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        assert acl.get(fd) == acl.Acl()
    finally:
        os.close(fd)
        m.close()


def test_a_readonly_peer_of_another_uid_cannot_reopen_its_fd_writable(daemon: Daemon) -> None:
    def peer() -> dict[str, Any]:
        with Mapper(daemon.path) as conn:
            fd, result = conn.get_fd("m")
            return {
                "readonly": result["readonly"],
                "rdwr": _reopen(fd, os.O_RDWR),
                "wronly": _reopen(fd, os.O_WRONLY),
                "rdonly": _reopen(fd, os.O_RDONLY),
                "truncate": _try(lambda: os.truncate(f"/proc/self/fd/{fd}", 0)),
                "ftruncate": _try(lambda: os.ftruncate(fd, 0)),
            }

    got = _as_uid(RO_UID, peer)
    assert got == {
        "readonly": True,
        "rdwr": "EACCES",
        "wronly": "EACCES",
        "rdonly": "ok",  # its read-only grant: it may reopen what it may map
        "truncate": "EACCES",
        "ftruncate": "EINVAL",
    }
    with Raw(daemon.path) as r:
        assert r.call("query-ram-blocks")[0]["size"] == SIZE
    m, fd = _block_fd(daemon)
    try:
        assert os.fstat(fd).st_size == SIZE
    finally:
        os.close(fd)
        m.close()


def test_a_full_peer_of_another_uid_reopens_its_fd_while_it_holds_the_block(
    daemon: Daemon,
) -> None:
    def peer() -> dict[str, Any]:
        conn = Mapper(daemon.path)
        fd, _ = conn.get_fd("m")
        out = {"rdwr": _reopen(fd, os.O_RDWR)}  # as QEMU's mem-path=/proc/self/fd/N does
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        os.pwrite(again, b"written by uid 4242", 0)
        os.close(again)
        conn.call("ram-block-put-fd", id="m")
        out["after put-fd"] = _reopen(fd, os.O_RDONLY)
        conn.close()
        return out

    assert _as_uid(FULL_UID, peer) == {"rdwr": "ok", "after put-fd": "EACCES"}
    m, fd = _block_fd(daemon)
    try:
        assert os.pread(fd, 19, 0) == b"written by uid 4242"
        assert acl.get(fd) == acl.Acl()  # the grant ended with the holding
    finally:
        os.close(fd)
        m.close()


def test_a_uid_may_write_only_while_one_of_its_holdings_is_writable(daemon: Daemon) -> None:
    def peer() -> list[str]:
        ro = Mapper(daemon.path)
        ro_fd, _ = ro.get_fd("m", readonly=True)
        steps = [_reopen(ro_fd, os.O_RDWR)]
        rw = Mapper(daemon.path)
        rw.get_fd("m")
        steps.append(_reopen(ro_fd, os.O_RDWR))  # its uid also holds the block writable
        rw.close()
        while ro.call("query-ram-blocks")[0]["mappers"] != 1:  # until the close is processed
            pass
        steps.append(_reopen(ro_fd, os.O_RDWR))
        steps.append(_reopen(ro_fd, os.O_RDONLY))
        ro.close()
        return steps

    assert _as_uid(FULL_UID, peer) == ["EACCES", "ok", "EACCES", "ok"]


def _mapper_child(path: Path, ready: int, go: int) -> int:
    """Fork a full mapper of uid 4242 that maps ``m``, fills it, then touches every page
    (write and read back) until a byte arrives on ``go``; returns its pid. It exits 0, 3
    when a page read back wrong, or dies of SIGBUS."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        os.setgroups([])
        os.setgid(FULL_UID)
        os.setuid(FULL_UID)
        conn = Mapper(path)
        fd, _ = conn.get_fd("m")
        mem = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.write(ready, b"r")
        rounds = 0
        while True:
            for page in range(PAGES):
                mem[page * PAGE : page * PAGE + 8] = rounds.to_bytes(8, "little")
            for page in range(PAGES):
                if mem[page * PAGE : page * PAGE + 8] != rounds.to_bytes(8, "little"):
                    os._exit(3)
            rounds += 1
            if rounds > 2 and select.select([go], [], [], 0)[0]:
                break
        code = 0
    finally:
        os._exit(code)


def _worst(path: Path) -> dict[str, int]:
    """A read-only peer's attempts to change ``m``'s file; how many of each succeeded."""
    conn = Mapper(path)
    fd, _ = conn.get_fd("m")
    done = {"reopen": 0, "truncate": 0, "ftruncate": 0, "fallocate": 0, "map-writable": 0}
    for _ in range(100):
        for flags in (os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
            try:
                again = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
            except OSError:
                continue
            done["reopen"] += 1
            os.ftruncate(again, 0)
            os.close(again)
        for what, call in (
            ("truncate", lambda: os.truncate(f"/proc/self/fd/{fd}", 0)),
            ("ftruncate", lambda: os.ftruncate(fd, 0)),
            ("fallocate", lambda: os.posix_fallocate(fd, 0, SIZE * 2)),
        ):
            try:
                call()
                done[what] += 1
            except OSError:
                pass
        try:
            mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
            done["map-writable"] += 1
        except OSError:
            pass
    conn.close()
    return done


def test_a_full_mapper_never_gets_sigbus_while_a_readonly_peer_tries_its_worst(
    daemon: Daemon,
) -> None:
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = _mapper_child(daemon.path, ready_w, go_r)
    os.close(ready_w)
    os.close(go_r)
    assert os.read(ready_r, 1) == b"r", "the mapper did not start"
    done = _as_uid(RO_UID, lambda: _worst(daemon.path))
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    os.close(ready_r)
    os.close(go_w)
    assert not os.WIFSIGNALED(status), f"the mapper died of {signal.Signals(os.WTERMSIG(status))!r}"
    assert os.WEXITSTATUS(status) == 0
    assert done == dict.fromkeys(done, 0)
    with Raw(daemon.path) as r:
        assert r.call("query-ram-blocks")[0]["size"] == SIZE


def test_acls_round_trip_through_the_kernel_and_malformed_ones_are_refused() -> None:
    fd = os.memfd_create("acl-test", os.MFD_CLOEXEC)
    try:
        assert acl.set_users(fd, {7: False, 5: True})
        assert acl.get(fd) == acl.Acl(users={5: 6, 7: 4}, mask=6)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o660  # group bits show the mask
        assert acl.set_users(fd, {})
        assert os.listxattr(fd) == [] and stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
    finally:
        os.close(fd)
    good = acl.encode(acl.Acl(users={5: 6}, mask=6))
    assert acl.decode(good) == acl.Acl(users={5: 6}, mask=6)
    swapped = good[:4] + good[12:20] + good[4:12] + good[20:]  # the named user before the owner
    no_mask = acl.encode(acl.Acl(users={5: 6}))
    for bad in (good[:-1], b"\x03\x00\x00\x00" + good[4:], swapped, no_mask):
        with pytest.raises(acl.BadAcl):
            acl.decode(bad)
