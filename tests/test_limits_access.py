"""Limits, access control, per-block serialisation and structured logs of the real daemon."""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30


def test_block_count_reserved_and_used_limits(start_daemon: Any) -> None:
    d = start_daemon('[limits]\nmax-blocks = 2\nmax-reserved = "1G"\nmax-used = "8M"\n')
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="a", size=MiB, **{"max-size": 512 * MiB})
        err = rpc.error("ram-block-add", id="b", size=MiB, **{"max-size": 600 * MiB})
        assert err["data"] == {"class": "GenericError"}
        assert err["message"].startswith(f"Limit exceeded: max-reserved is {GiB}")
        err = rpc.error("ram-block-add", id="b", size=9 * MiB)
        assert err["message"].startswith(f"Limit exceeded: max-used is {8 * MiB}")
        err = rpc.error("ram-block-resize", id="a", size=9 * MiB)
        assert err["message"].startswith(f"Limit exceeded: max-used is {8 * MiB}")
        rpc.call("ram-block-add", id="b", size=MiB)
        err = rpc.error("ram-block-add", id="c", size=PAGE)
        assert err["message"].startswith("Limit exceeded: max-blocks is 2")
        stats = rpc.call("query-stats")
        assert stats["blocks"] == 2 and stats["used"] == 2 * MiB
        assert stats["reserved"] == 512 * MiB + MiB + 2 * PAGE
        assert stats["limits"]["max-blocks"] == 2 and stats["limits"]["max-used"] == 8 * MiB
        rpc.call("ram-block-del", id="b")
        rpc.call("ram-block-add", id="c", size=PAGE)


def test_connections_past_the_limit_get_one_error_and_are_closed(start_daemon: Any) -> None:
    d = start_daemon("[limits]\nmax-connections = 3\n")
    first = Raw(d.path)
    while first.call("query-stats")["clients"] != 1:  # the start-up probe is still closing
        pass
    held = [first, Raw(d.path), Raw(d.path)]
    for r in held:
        assert r.call("query-version")
    extra = Raw(d.path)
    msg = extra.line()
    assert msg["error"]["message"] == "Limit exceeded: max-connections is 3"
    assert msg["error"]["data"] == {"class": "GenericError"}
    with pytest.raises(ConnectionError):
        extra.line()
    extra.close()
    held.pop().close()
    for _ in range(50):
        try:
            with Raw(d.path) as again:
                assert again.call("query-version")
            break
        except (ConnectionError, AssertionError, KeyError):
            continue
    else:
        raise AssertionError("a freed connection slot was never reusable")
    for r in held:
        r.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ramd-access-"))
    os.chmod(d, 0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _as_user(uid: int, gid: int, path: Path, requests: list[dict[str, Any]]) -> list[Any]:
    """Fork; the child drops to uid/gid, sends ``requests`` one by one and reports each answer
    (or "closed") through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        answers: list[Any] = []
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with Raw(path) as conn:
                for req in requests:
                    try:
                        conn.send(json.dumps({"jsonrpc": "2.0", "id": 1, **req}).encode())
                        answers.append(conn.line())
                    except (ConnectionError, OSError):
                        answers.append("closed")
        except Exception as e:
            answers.append(f"child failed: {e!r}")
        os.write(w, json.dumps(answers).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)  # type: ignore[no-any-return]


def test_peer_credentials_decide_access(start_daemon: Any, shared_dir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run clients under other uids")
    cfg = (
        'socket-mode = "0666"\nallow-uids = [0, 4242]\nreadonly-uids = [4243]\n'
        "readonly-gids = [4300]\n"
    )
    d = Daemon(shared_dir, cfg)
    try:
        assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o666
        add = {"method": "ram-block-add", "params": {"id": "x", "size": PAGE}}
        query = {"method": "query-ram-blocks"}
        full = _as_user(4242, 4242, d.path, [add, query])
        assert full[0]["result"]["id"] == "x" and len(full[1]["result"]) == 1
        sub = {"method": "subscribe", "params": {"replay": False}}
        read = {"method": "ram-block-read", "params": {"id": "x", "offset": 0, "length": 8}}
        ro = _as_user(4243, 4243, d.path, [query, add, sub, read])
        assert [b["id"] for b in ro[0]["result"]] == ["x"]
        assert ro[1]["error"]["data"] == {"class": "GenericError"}
        assert ro[1]["error"]["message"].startswith("Permission denied")
        assert ro[2]["result"]["seq"] == 1
        assert ro[3]["error"]["message"].startswith("Permission denied")
        ro_group = _as_user(
            4999, 4300, d.path, [{"method": "ram-block-del", "params": {"id": "x"}}]
        )
        assert ro_group[0]["error"]["message"].startswith("Permission denied")
        refused = _as_user(4244, 4244, d.path, [query])
        assert refused[0] == "closed" or refused[0]["error"]["message"].startswith(
            "Permission denied"
        )
        log = d.log_text()
        assert "uid=4244" in log and "Permission denied" in log
        with Raw(d.path) as root:
            assert [b["id"] for b in root.call("query-ram-blocks")] == ["x"]
    finally:
        assert d.stop() == 0


def test_socket_group_and_mode_from_config(shared_dir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to chown the socket")
    d = Daemon(shared_dir, 'socket-mode = "0660"\nsocket-group = 4300\n')
    try:
        st = os.stat(d.path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 4300
    finally:
        d.stop()


def test_prealloc_does_not_block_others_and_same_block_is_busy(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path, timeout=60) as a, Raw(reused_daemon.path) as b:
        a.send(
            json.dumps(
                {
                    "jsonrpc": "2.0",
                    "method": "ram-block-add",
                    "params": {"id": "big", "size": 3 * GiB, "prealloc": True},
                    "id": 1,
                }
            ).encode()
        )
        busy = None
        for _ in range(2000):
            resp = b.request("ram-block-resize", id="big", size=PAGE)
            if "busy" in resp.get("error", {}).get("message", ""):
                busy = resp["error"]
                break
        assert busy is not None, "never saw the block busy"
        assert busy["data"] == {"class": "GenericError"}
        assert b.error("ram-block-del", id="big")["message"].endswith("being preallocated")
        assert b.error("ram-block-add", id="big", size=PAGE)["message"].endswith("already exists")
        assert b.call("query-version")
        assert b.call("query-ram-blocks") == []
        still_running = select.select([a.sock], [], [], 0)[0] == []
        info = a.reply()["result"]
        assert info["prealloc"] and info["size"] == 3 * GiB
        assert still_running, "prealloc finished before the other client was served"
        assert [x["id"] for x in b.call("query-ram-blocks")] == ["big"]


def test_json_log_lines(start_daemon: Any) -> None:
    d = start_daemon("", "--log-format", "json")
    with Raw(d.path) as rpc:
        rpc.error("ram-block-del", id="nope")
    d.stop()
    records = [json.loads(line) for line in d.log_text().splitlines() if line.strip()]
    accepted = [r for r in records if r.get("event") == "accepted"]
    assert accepted and accepted[0]["pid"] > 0 and accepted[0]["uid"] == os.getuid()
    refused = [r for r in records if r.get("event") == "refused-request"]
    assert refused[0]["command"] == "ram-block-del"
    assert "DeviceNotFound" in refused[0]["reason"]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)


def test_socket_unavailable_to_others_by_default(reused_daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(reused_daemon.path).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(reused_daemon.path))


def test_idle_connections_are_closed_and_subscribers_are_not(start_daemon: Any) -> None:
    timeout = 2.0
    d = start_daemon(f"[limits]\nidle-timeout = {timeout:g}\n")
    with Raw(d.path) as idle, Raw(d.path) as subscriber, Raw(d.path) as busy:
        subscriber.call("subscribe")
        t0 = time.monotonic()
        idle.sock.settimeout(0.05)

        def ping_for(seconds: float, watch_idle: bool) -> bool:
            """The busy client asks something every 0.2 s (10 times per timeout) for
            ``seconds``; True as soon as the idle one is seen closed (if watched)."""
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                assert busy.call("query-version")
                if watch_idle:
                    try:
                        idle.line()
                    except ConnectionError:
                        return True
                    except TimeoutError:
                        pass
                time.sleep(0.2)
            return False

        assert ping_for(60, watch_idle=True), "the idle connection was never closed"
        assert time.monotonic() - t0 >= timeout / 2
        ping_for(timeout * 1.5, watch_idle=False)  # the subscriber stays silent well past it
        assert subscriber.call("query-version") and busy.call("query-version")
    assert "closing idle connection" in d.log_text()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_successful_change_is_one_audit_line_naming_the_peer(
    start_daemon: Any, fmt: str
) -> None:
    d = start_daemon('log-level = "info"\n', "--log-format", fmt, "--log-level", "info")
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="a", size=PAGE, **{"max-size": MiB})
        rpc.call("ram-block-resize", id="a", size=2 * PAGE)
        rpc.call("ram-block-write", id="a", offset=0, data="AA==")  # not a change of the set
        rpc.error("ram-block-resize", id="a", size=2 * MiB)  # refused: no audit line
        rpc.call("ram-block-del", id="a")
    d.stop()
    pid = os.getpid()
    if fmt == "json":
        records = [json.loads(line) for line in d.log_text().splitlines() if line.strip()]
        changes = [r for r in records if r.get("event") == "change"]
        assert [(r["command"], r["target"]) for r in changes] == [
            ("ram-block-add", "a"), ("ram-block-resize", "a"), ("ram-block-del", "a"),
        ]  # fmt: skip
        assert all(r["pid"] == pid and r["uid"] == os.getuid() for r in changes)
    else:
        lines = [line for line in d.log_text().splitlines() if " ramd.audit: " in line]
        assert [line.split(" ramd.audit: ")[1] for line in lines] == [
            f"ram-block-add 'a' size={PAGE} by pid={pid} uid=0 gid=0",
            f"ram-block-resize 'a' size={2 * PAGE} by pid={pid} uid=0 gid=0",
            f"ram-block-del 'a' by pid={pid} uid=0 gid=0",
        ]
    text = d.log_text()
    assert "accepted connection" not in text  # connects and closes are debug lines
