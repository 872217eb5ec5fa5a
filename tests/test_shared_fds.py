"""Shared blocks handed to other processes: fds over the socket, mappers, acknowledged release
(docs/protocol.md §8), and QEMU's getfd/closefd (§10). Real daemon, real fds, real mappings."""

from __future__ import annotations

import array
import base64
import json
import mmap
import os
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw
from fdpeer import Mapper

PAGE = 4096
MiB = 1 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _maps_line(pid: int, addr: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line
    raise AssertionError(f"{addr:#x} not mapped")


@pytest.fixture
def shared(reused_daemon: Daemon) -> Daemon:
    """A pooled daemon of each loop (see conftest.py)."""
    return reused_daemon


def test_a_second_process_maps_the_fd_and_shares_the_memory(shared: Daemon) -> None:
    with Mapper(shared.path) as rpc:
        rpc.call("ram-block-add", id="m", size=4 * PAGE, backend="memfd", **{"max-size": MiB})
        rpc.call("ram-block-write", id="m", offset=100, data=_b64(b"from the daemon"))
        fd, result = rpc.get_fd("m")
        assert result == {
            "id": "m", "size": 4 * PAGE, "max-size": MiB, "page-size": PAGE, "readonly": False,
        }  # fmt: skip
        assert os.fstat(fd).st_size == 4 * PAGE
        with mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED) as view:
            assert view[100:115] == b"from the daemon"
            view[200:213] = b"from a mapper"
        got = rpc.call("ram-block-read", id="m", offset=200, length=13)
        assert base64.b64decode(got["data"]) == b"from a mapper"
        (info,) = rpc.call("query-ram-blocks", id="m")
        assert info["mappers"] == 1 and info["shared"]
        os.close(fd)
        assert rpc.call("ram-block-put-fd", id="m") == {}
        assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 0


def test_qmp_passes_the_fd_too(start_daemon: Any) -> None:
    d = start_daemon(qmp=True)
    assert d.qmp_path is not None
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="m", size=PAGE, backend="memfd")
        rpc.call("ram-block-write", id="m", offset=0, data=_b64(b"qmp"))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.qmp_path))
        s.sendall(b'{"execute":"qmp_capabilities"}{"execute":"ram-block-get-fd",'
                  b'"arguments":{"id":"m","readonly":true},"id":1}')  # fmt: skip
        buf, fds = b"", array.array("i")
        while buf.count(b"\n") < 3:
            data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(16))
            for _, _, raw in anc:
                fds.frombytes(raw[: len(raw) - len(raw) % 4])
            assert data
            buf += data
        answer = json.loads(buf.splitlines()[2])
        assert answer["return"]["readonly"] is True and answer["id"] == 1
        assert len(fds) == 1
        with mmap.mmap(fds[0], PAGE, mmap.MAP_SHARED, mmap.PROT_READ) as view:
            assert view[:3] == b"qmp"
        os.close(fds[0])


def test_anonymous_blocks_have_no_fd_and_readonly_fds_cannot_write(shared: Daemon) -> None:
    with Mapper(shared.path) as rpc:
        rpc.call("ram-block-add", id="a", size=PAGE)
        err = rpc.error("ram-block-get-fd", id="a")
        assert err["message"] == "RAM block 'a' is not shared (backend anonymous)"
        rpc.call("ram-block-add", id="m", size=PAGE, backend="memfd")
        fd, result = rpc.get_fd("m", readonly=True)
        assert result["readonly"] is True
        with pytest.raises(PermissionError):
            mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
        os.close(fd)


def test_readonly_peers_get_readonly_fds_only(start_daemon: Any) -> None:
    d = start_daemon('readonly-uids = [0]\n[[block]]\nid = "m"\nsize = 4096\nbackend = "memfd"\n')
    with Mapper(d.path) as ro:
        fd, result = ro.get_fd("m")
        assert result["readonly"] is True
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
        os.close(fd)


def _shrink_setup(rpc: Mapper) -> tuple[int, int]:
    rpc.call("ram-block-add", id="m", size=64 * MiB, backend="memfd", **{"max-size": 128 * MiB})
    host = rpc.call("query-ram-blocks", id="m")[0]["host"]
    fd, _ = rpc.get_fd("m")
    with mmap.mmap(fd, 64 * MiB, mmap.MAP_SHARED) as view:
        view[:] = b"\xaa" * (64 * MiB)
    return fd, host


def test_a_shrink_waits_for_the_mappers_acknowledgement(shared: Daemon) -> None:
    with Mapper(shared.path) as mapper, Mapper(shared.path) as resizer:
        fd, host = _shrink_setup(mapper)
        blocks_before = os.fstat(fd).st_blocks
        resizer.send(b'{"jsonrpc":"2.0","method":"ram-block-resize",'
                     b'"params":{"id":"m","size":4096},"id":9}')  # fmt: skip
        event = mapper.line()
        assert event["method"] == "RAM_BLOCK_RESIZED"
        data = event["params"]["data"]
        assert (data["old-size"], data["new-size"], data["ack"]) == (64 * MiB, PAGE, True)
        # Not acknowledged yet: the tail is still mapped and backed, the resizer unanswered.
        time.sleep(0.2)
        assert "rw-s" in _maps_line(shared.pid, host + 32 * MiB)
        assert os.fstat(fd).st_size == 64 * MiB
        assert select.select([resizer.sock], [], [], 0)[0] == []
        err = mapper.error("ram-block-write", id="m", offset=0, data=_b64(b"x"))
        assert err["message"] == "RAM block 'm' is busy: waiting for 1 mapper(s)"
        assert mapper.call("ram-block-ack", seq=data["seq"]) == {}
        assert resizer.reply()["result"]["size"] == PAGE
        assert "---p" in _maps_line(shared.pid, host + 32 * MiB)
        assert os.fstat(fd).st_size == PAGE
        assert os.fstat(fd).st_blocks < blocks_before // 100
        os.close(fd)


def test_safe_mode_rolls_back_and_hard_mode_disconnects(start_daemon: Any) -> None:
    d = start_daemon("[limits]\nack-timeout = 0.5\n")
    with Mapper(d.path) as mapper, Mapper(d.path) as resizer:
        fd, host = _shrink_setup(mapper)
        err = resizer.error("ram-block-resize", id="m", size=PAGE)
        assert err["message"] == "Timed out waiting for 1 mapper(s) of RAM block 'm'"
        shrink, back = mapper.line(), mapper.line()
        assert shrink["params"]["data"]["new-size"] == PAGE
        assert back["params"]["data"]["new-size"] == 64 * MiB
        assert back["params"]["data"]["ack"] is False
        assert os.fstat(fd).st_size == 64 * MiB
        assert "rw-s" in _maps_line(d.pid, host + 32 * MiB)
        with mmap.mmap(fd, 64 * MiB, mmap.MAP_SHARED) as view:
            assert view[-1] == 0xAA  # nothing was released
        assert resizer.call("query-ram-blocks", id="m")[0]["size"] == 64 * MiB
        got = resizer.call("ram-block-resize", id="m", size=PAGE, mode="hard")
        assert got["size"] == PAGE
        with pytest.raises(ConnectionError):
            while True:
                mapper.line()
        assert os.fstat(fd).st_size == PAGE
        assert "---p" in _maps_line(d.pid, host + 32 * MiB)
        os.close(fd)
    assert "did not acknowledge event" in d.log_text()


def test_remove_waits_for_acknowledgement_and_frees_the_memory(shared: Daemon) -> None:
    with Mapper(shared.path) as mapper, Mapper(shared.path) as other:
        fd, _ = _shrink_setup(mapper)
        other.send(b'{"jsonrpc":"2.0","method":"ram-block-del","params":{"id":"m"},"id":3}')
        event = mapper.line()
        assert event["method"] == "RAM_BLOCK_REMOVED" and event["params"]["data"]["ack"] is True
        assert mapper.call("query-ram-blocks", id="m")[0]["id"] == "m"
        mapper.call("ram-block-ack", seq=event["params"]["data"]["seq"])
        assert other.reply()["result"] == {}
        assert other.call("query-ram-blocks") == []
        # The daemon let go: our fd is the last reference.
        assert not any(
            os.readlink(f"/proc/{shared.pid}/fd/{n}").startswith("/memfd:ramd:m")
            for n in os.listdir(f"/proc/{shared.pid}/fd")
        )
        os.close(fd)


def test_a_mapper_that_truncates_the_file_cannot_crash_the_daemon(shared: Daemon) -> None:
    with Mapper(shared.path) as rpc:
        rpc.call("ram-block-add", id="m", size=MiB, backend="memfd")
        fd, _ = rpc.get_fd("m")
        os.ftruncate(fd, 0)
        read = rpc.error("ram-block-read", id="m", offset=0, length=MiB)
        write = rpc.error("ram-block-write", id="m", offset=0, data=_b64(b"y" * 4096))
        assert "shorter than its size" in read["message"]
        assert "shorter than its size" in write["message"]
        assert rpc.call("query-version")
        os.close(fd)
    assert shared.alive()


def test_getfd_and_closefd_never_leak_fds(shared: Daemon) -> None:
    baseline = shared.fd_count()
    with Mapper(shared.path) as rpc:
        r, w = os.pipe()
        try:
            msg = {"jsonrpc": "2.0", "method": "getfd", "params": {"fdname": "img"}, "id": 1}
            rpc.send_with_fd(msg, w)
            assert rpc.reply()["result"] == {}
            err = rpc.error("getfd", fdname="other")
            assert err["message"] == "No file descriptor supplied via SCM_RIGHTS"
            assert rpc.call("closefd", fdname="img") == {}
            err = rpc.error("closefd", fdname="img")
            assert err["message"] == "File descriptor named 'img' not found"
            # Many fds at once: a few wait for getfd, the rest are closed on arrival.
            rights = array.array("i", [w] * 8)
            rpc.sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            rpc.send_with_fd({**msg, "params": {"fdname": "x"}}, w)
            assert rpc.reply()["result"] == {}
        finally:
            os.close(r)
            os.close(w)
    # (the start-up probe's connection may still have been open when the baseline was taken)
    deadline = time.monotonic() + 5
    while shared.fd_count() > baseline:
        assert time.monotonic() < deadline, (shared.fd_count(), baseline)
        time.sleep(0.02)


C_MAPPER = r"""
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) return 2;
    const char *req = "{\"jsonrpc\":\"2.0\",\"method\":\"ram-block-get-fd\","
                      "\"params\":{\"id\":\"m\"},\"id\":1}";
    write(s, req, strlen(req));
    char buf[512], ctl[CMSG_SPACE(sizeof(int))];
    struct iovec io = {buf, sizeof buf - 1};
    struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1,
                       .msg_control = ctl, .msg_controllen = sizeof ctl};
    ssize_t n = recvmsg(s, &m, 0);
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    if (n <= 0 || !c || c->cmsg_type != SCM_RIGHTS) return 3;
    int fd; memcpy(&fd, CMSG_DATA(c), sizeof fd);
    char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return 4;
    printf("%.7s\n", p);
    memcpy(p + 64, "written by C", 12);
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_a_c_program_maps_the_block(shared: Daemon, tmp_path: Path) -> None:
    src = tmp_path / "mapper.c"
    src.write_text(C_MAPPER)
    exe = tmp_path / "mapper"
    subprocess.run(["cc", "-O1", "-o", str(exe), str(src)], check=True)
    with Raw(shared.path) as rpc:
        rpc.call("ram-block-add", id="m", size=PAGE, backend="memfd")
        rpc.call("ram-block-write", id="m", offset=0, data=_b64(b"hello C"))
        out = subprocess.run([str(exe), str(shared.path)], capture_output=True, timeout=30)
        assert out.returncode == 0, out
        assert out.stdout == b"hello C\n"
        got = rpc.call("ram-block-read", id="m", offset=64, length=12)
        assert base64.b64decode(got["data"]) == b"written by C"
