"""fd passing under peers that do not read (docs/protocol.md §11, issue 21 point 4): fds in flight
count against the daemon's ``RLIMIT_NOFILE``, so a connection has at most one unread answer
with fds, batches of fds share half of the limit, a batch over ``SCM_MAX_FD`` is refused, and
an answer whose fds cannot go fails its requests while the connection keeps working. Real
daemons (one as an unprivileged uid with a limit of 1024), real sockets, real fds."""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw
from fdpeer import Mapper
from unprivileged import unprivileged_daemon

MiB = 1 << 20


def _get_fd(req_id: int, block: str = "m") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "ram-block-get-fd", "params": {"id": block}, "id": req_id}


class FdConn(Mapper):
    """A mapper connection that takes a whole batch's fds in one read (253: SCM_MAX_FD)."""

    MAX_FDS = 253

    def __init__(self, path: Path | str, timeout: float = 60.0) -> None:
        super().__init__(path, timeout)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def waiting(self) -> int:
        """Bytes the daemon sent that this side has not read (``FIONREAD``)."""
        count = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, count)
        return count[0]

    def close(self) -> None:
        for fd in self.take_fds():
            os.close(fd)
        super().close()


def _steady(conns: list[FdConn]) -> list[int]:
    """What each connection has received once nothing more arrives for a while (the daemon
    sends what it will send to peers that do not read)."""
    seen: list[int] = []
    quiet = 0
    while quiet < 5:
        time.sleep(0.1)
        now = [c.waiting() for c in conns]
        quiet = quiet + 1 if now == seen else 0
        seen = now
    return seen


@pytest.fixture
def limited() -> Iterator[Daemon]:
    """The daemon as the unit runs it, at a ``RLIMIT_NOFILE`` of 1024, with a memfd block."""
    with unprivileged_daemon() as d:
        with Raw(d.path) as rpc:
            rpc.call("ram-block-add", id="m", size=MiB, backend="memfd")
        yield d


def test_peers_that_never_read_their_fds_cannot_stop_fd_passing(limited: Daemon) -> None:
    """8 connections pipeline 300 get-fd each and read nothing: before, the daemon sent them
    all, over 1024 fds were in flight and every later sendmsg with an fd failed
    (ETOOMANYREFS), muting its connection. Now each gets one, the rest wait for it to read."""
    attackers = [FdConn(limited.path) for _ in range(8)]
    try:
        batch = b"".join(json.dumps(_get_fd(i)).encode() for i in range(300))
        for a in attackers:
            a.send(batch)
        received = _steady(attackers)
        assert all(received), received
        with FdConn(limited.path) as victim:
            for i in range(3):
                victim.send(json.dumps(_get_fd(i)).encode())
                assert victim.reply()["result"]["size"] == MiB
                fds = victim.take_fds()
                assert len(fds) == 1 and os.fstat(fds[0]).st_size == MiB
                os.close(fds[0])
        # Nothing was lost: a peer that reads gets all its answers, each with its fd.
        reader = attackers[0]
        for i in range(300):
            answer = reader.reply()
            assert answer["id"] == i and answer["result"]["size"] == MiB, answer
            fds = reader.take_fds()
            assert len(fds) == 1, (i, fds)
            os.close(fds[0])
        with Raw(limited.path) as rpc:
            assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 8
    finally:
        for a in attackers:
            a.close()
    assert "not sent, the request fails" not in limited.log_text()


def test_batches_of_fds_nobody_reads_get_half_the_limit_and_fail_past_it(
    limited: Daemon,
) -> None:
    """Batches carrying many fds share half of RLIMIT_NOFILE: past it, the batch's get-fd
    calls fail naming the limit and the connection goes on; single fds still go."""
    batch = json.dumps([_get_fd(i) for i in range(253)]).encode()
    with FdConn(limited.path) as a, FdConn(limited.path) as b, FdConn(limited.path) as c:
        for peer in (a, b):
            peer.send(batch)
        while not (a.waiting() and b.waiting()):  # 506 fds now in flight, unread
            time.sleep(0.02)
        c.send(batch)
        answers = c.reply()
        assert isinstance(answers, list) and len(answers) == 253
        assert c.take_fds() == []
        for answer in answers:
            assert answer["error"]["data"] == {"class": "GenericError"}, answer
            assert answer["error"]["message"].startswith("Limit exceeded: fd budget: "), answer
            assert "RLIMIT_NOFILE is 1024" in answer["error"]["message"]
        # c is no mapper: it got no fd (a and b are, though they have not read theirs yet)
        assert c.call("query-ram-blocks", id="m")[0]["mappers"] == 2
        with FdConn(limited.path) as victim:
            assert victim.call("ram-block-get-fd", id="m")["size"] == MiB
            assert len(victim.fds) == 1
        answers = a.reply()
        assert isinstance(answers, list) and all("result" in x for x in answers)
        assert len(a.fds) == 253
        # a read its fds: they no longer count, and c's batch goes now
        c.send(batch)
        answers = c.reply()
        assert isinstance(answers, list) and all("result" in x for x in answers), answers[0]
        assert len(c.fds) == 253
    assert "253 fd(s) not sent, the request fails: Limit exceeded: fd budget" in limited.log_text()


def test_a_batch_over_scm_max_fd_is_refused_whole(reused_shared_daemon: Daemon) -> None:
    """253 fds fit in one sendmsg (SCM_MAX_FD); a batch whose answers would carry more was
    run, then failed in sendmsg and muted the connection. Now it is refused unrun."""
    with FdConn(reused_shared_daemon.path) as rpc:
        rpc.call("ram-block-add", id="m", size=MiB, backend="memfd")
        rpc.send(json.dumps([_get_fd(i) for i in range(254)]).encode())
        refusal = rpc.reply()
        assert isinstance(refusal, dict) and refusal["error"]["code"] == -32600, refusal
        assert "at most 253 file descriptors (SCM_MAX_FD)" in refusal["error"]["data"]
        assert rpc.take_fds() == []
        assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 0
        rpc.send(json.dumps([_get_fd(i) for i in range(253)]).encode())
        answers = rpc.reply()
        assert isinstance(answers, list) and [x["id"] for x in answers] == list(range(253))
        assert len(rpc.fds) == 253
        assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 1


# -- fds a client sends: kept only for a getfd of the same message (issue 21, point 5) -------


def _send_fds(conn: Raw, data: bytes, fds: list[int]) -> None:
    conn.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def _wait_fd_count(d: Daemon, at_most: int) -> None:
    """Until the daemon holds at most ``at_most`` fds (it closes them on the loop thread)."""
    deadline = time.monotonic() + 10
    while d.fd_count() > at_most:
        assert time.monotonic() < deadline, (d.fd_count(), at_most)
        time.sleep(0.02)


def test_fds_sent_with_another_message_are_closed_not_kept(any_daemon: Daemon) -> None:
    """Before, up to 4 fds sent with any message waited in a queue for a later getfd, so a
    peer could hold 4 of the daemon's fds per connection for ever."""
    with Raw(any_daemon.path) as rpc:
        assert rpc.call("query-version")
        baseline = any_daemon.fd_count()
        r, w = os.pipe()
        try:
            _send_fds(rpc, b'{"jsonrpc":"2.0","method":"query-version","id":1}', [r, w, r, w])
            assert "result" in rpc.reply()
            _wait_fd_count(any_daemon, baseline)
            err = rpc.error("getfd", fdname="late")
            assert err["message"] == "No file descriptor supplied via SCM_RIGHTS"
            # A getfd sent in the same write as another message (the fd comes with the first
            # byte of the write): the getfd keeps it, the other one is answered as usual.
            getfd = b'{"jsonrpc":"2.0","method":"getfd","params":{"fdname":"img"},"id":2}'
            _send_fds(rpc, getfd + b'{"jsonrpc":"2.0","method":"query-version","id":3}', [w])
            assert rpc.reply() == {"jsonrpc": "2.0", "result": {}, "id": 2}
            assert "result" in rpc.reply()
            assert rpc.call("closefd", fdname="img") == {}
        finally:
            os.close(r)
            os.close(w)
        _wait_fd_count(any_daemon, baseline)


async def test_qemu_qmp_send_fd_scm_then_getfd(any_daemon: Daemon) -> None:
    """qemu.qmp sends the fd with one space, then the getfd: whitespace before a message is
    part of it, so the getfd gets the fd; an fd sent before another command is closed."""
    from qemu.qmp import ExecuteError, QMPClient

    assert any_daemon.qmp_path is not None
    baseline = any_daemon.fd_count()
    client = QMPClient("ramd-test")
    await client.connect(str(any_daemon.qmp_path))
    r, w = os.pipe()
    try:
        client.send_fd_scm(w)
        assert await client.execute("getfd", {"fdname": "out"}) == {}
        client.send_fd_scm(r)
        assert await client.execute("query-version")
        with pytest.raises(ExecuteError, match="No file descriptor supplied"):
            await client.execute("getfd", {"fdname": "in"})
        assert await client.execute("closefd", {"fdname": "out"}) == {}
    finally:
        await client.disconnect()
        os.close(r)
        os.close(w)
    _wait_fd_count(any_daemon, baseline)


# -- the fd budget (issue 21, point 5) -------------------------------------------------------


def _start_log(d: Daemon) -> str:
    """The daemon's log once it has logged its limits (after its sockets listen)."""
    deadline = time.monotonic() + 30
    while " limits: " not in (text := d.log_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.02)
    return text


def test_rlimit_nofile_is_raised_to_the_hard_limit_at_start() -> None:
    with unprivileged_daemon(nofile=1024) as d:
        assert "RLIMIT_NOFILE 1024 (fd budget 832)" in _start_log(d)
    if os.getuid() == 0:
        wrap = ["prlimit", "--nofile=512:4096", "--"]
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(Path(tmp), "", wrap=wrap)
            try:
                limits = Path(f"/proc/{d.pid}/limits").read_text()
                assert any(
                    line.startswith("Max open files") and line.split()[3:5] == ["4096", "4096"]
                    for line in limits.splitlines()
                ), limits
                assert "RLIMIT_NOFILE 4096 (fd budget 3904)" in _start_log(d)
            finally:
                d.stop()


def test_shared_blocks_past_the_fd_budget_are_refused_naming_it() -> None:
    """Before, the 1,013th memfd block failed with "Too many open files" and left the daemon
    at its fd limit (accept, open, everything failed). Now shared blocks stop at the fd budget
    with a refusal naming it; anonymous blocks hold no fd and are not refused by it."""
    with unprivileged_daemon() as d, Raw(d.path) as rpc:
        refusal = None
        for i in range(1013):
            answer = rpc.request("ram-block-add", id=f"m{i}", size=4096, backend="memfd")
            if "error" in answer:
                refusal = answer["error"]
                break
        assert refusal is not None, "no block refused"
        assert refusal["data"] == {"class": "GenericError"}
        assert refusal["message"].startswith("Limit exceeded: fd budget is 832 (RLIMIT_NOFILE 1024")
        assert "no room for another shared block" in refusal["message"]
        assert d.fd_count() < 1000
        err = rpc.error("ram-block-add", id="f", size=4096, backend="file")
        assert err["message"].startswith("Limit exceeded: fd budget is 832")
        assert rpc.call("ram-block-add", id="anon", size=4096)["backend"] == "anonymous"
        # The daemon stays usable: room again after a removal, new connections, fds.
        rpc.call("ram-block-del", id="m1")
        assert rpc.call("ram-block-add", id="again", size=4096, backend="memfd")["id"] == "again"
        with FdConn(d.path) as other:
            assert other.call("ram-block-get-fd", id="m0")["size"] == 4096
            assert len(other.fds) == 1
        assert "Too many open files" not in d.log_text()


READONLY_UID = 61000 + os.getpid() % 1000


def _hold_connections(path: Path, uid: int, report: int, release: int) -> None:
    """In a child as ``uid``: open connections until refused, each sending one space with 4
    fds and nothing else (fds kept for a getfd that never comes); report how many were taken
    and the refusal, then hold them until ``release`` is readable."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    conns: list[socket.socket] = []
    refusal = ""
    r, w = os.pipe()
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(path))
        s.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w] * 2))])
        conns.append(s)
        s.setblocking(False)
        try:
            data = s.recv(4096)
        except BlockingIOError:
            data = b""
        if data:  # a refusal is the only thing said unasked
            refusal = data.decode()
            break
        s.setblocking(True)
        s.send(b'{"jsonrpc":"2.0","method":"query-version","id":1}')
        answer = s.recv(4096)
        if b'"result"' not in answer:
            refusal = answer.decode()
            break
        s.send(b" ")  # the fds of this space wait for the next message, which never comes
    os.write(report, json.dumps([len(conns), refusal]).encode())
    os.read(release, 1)


def test_read_only_peers_holding_connections_and_fds_cannot_lock_out_root() -> None:
    """Before, read-only peers whose connections each kept 4 unclaimed fds exhausted the fd
    table at 1024: nobody, root included, could connect, and the log got a line per try."""
    config = (
        f'socket-mode = "0666"\nreadonly-uids = [{READONLY_UID}]\n'
        "[limits]\nmax-connections = 1000\nmax-connections-per-uid = 1000\n"
    )
    with unprivileged_daemon(config) as d:
        with Raw(d.path) as rpc:
            rpc.call("ram-block-add", id="m", size=MiB, backend="memfd")
        report_r, report_w = os.pipe()
        release_r, release_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _hold_connections(d.path, READONLY_UID, report_w, release_r)
            except BaseException as e:
                os.write(report_w, json.dumps([0, f"child failed: {e!r}"]).encode())
            finally:
                os._exit(0)
        os.close(report_w)
        os.close(release_r)
        try:
            taken, refusal = json.loads(os.read(report_r, 65536))
            assert 20 < taken < 300, (taken, refusal)
            assert "Limit exceeded: fd budget is 832" in refusal, refusal
            assert "no room for another connection" in refusal
            assert d.fd_count() < 1000
            with FdConn(d.path) as root:
                assert root.call("ram-block-get-fd", id="m")["size"] == MiB
                assert len(root.fds) == 1
            refused_lines = d.log_text().count("refused connection")
            assert 1 <= refused_lines <= 25, refused_lines
        finally:
            os.write(release_w, b"x")
            os.close(release_w)
            os.close(report_r)
            os.waitpid(pid, 0)


def test_the_budget_of_a_connection_counts_every_fd_it_may_hold() -> None:
    from ramd.api.fd_commands import MAX_NAMED_FDS
    from ramd.process import fdbudget
    from ramd.transport.sockets.pipeline import MAX_RECEIVED_FDS
    from ramd.transport.sockets.server import MAX_LINGERING

    assert fdbudget.PER_CONNECTION == 2 + MAX_RECEIVED_FDS + MAX_NAMED_FDS + 1
    assert fdbudget.LINGERING_FDS == 2 * MAX_LINGERING


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_running_out_of_fds_is_logged_once_per_interval_and_passes(loop: str) -> None:
    """A limit below the daemon's own margin (budget 0): every connection is refused, and
    refused connections linger until the fd table is full, so accepting fails (EMFILE).
    Before, the log got a line per try (135,000 in 14 s); now one per interval, and the
    daemon accepts again once fds are free."""
    with unprivileged_daemon("", "--event-loop", loop, nofile=100) as d:
        socks: list[socket.socket] = []
        try:
            end = time.monotonic() + 3
            while time.monotonic() < end and len(socks) < 400:
                s = socket.socket(socket.AF_UNIX)
                socks.append(s)
                s.settimeout(2)
                try:
                    s.connect(str(d.path))
                except OSError:  # the backlog is full too
                    break
                time.sleep(0.005)
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + 30
        while True:  # the loop retries accept about once a second; the backlog drains
            try:
                late = Raw(d.path)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with late:
            refusal = late.line()
        assert isinstance(refusal, dict)
        assert refusal["error"]["message"].startswith("Limit exceeded: fd budget is 0")
        text = d.log_text()
        assert text.count("Too many open files") == 1, text[-3000:]
