"""Access by every group of the peer (SO_PEERGROUPS) and fair connection slots, with real
setuid children as the peers (docs/protocol.md §11)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from daemon import Daemon, Raw

PAGE = 4096
RO_GROUP, ALLOW_GROUP = 4300, 4400

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to run peers as other users")


class AsUser:
    """A forked child that drops to ``uid``/``gid``/``groups``, runs ``fn(*args)`` and reports
    its JSON result; it keeps whatever ``fn`` opened until the context exits."""

    def __init__(
        self, uid: int, gid: int, groups: list[int], fn: Callable[..., Any], *args: Any
    ) -> None:
        self.ids = (uid, gid, groups)
        self.fn, self.args = fn, args
        self.result: Any = None

    def __enter__(self) -> AsUser:
        res_r, res_w = os.pipe()
        self._release_r, self._release_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(res_r)
            os.close(self._release_w)
            try:
                uid, gid, groups = self.ids
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
                held: list[Any] = []
                out = self.fn(held, *self.args)
            except BaseException as e:
                out = f"child failed: {e!r}"
            os.write(res_w, json.dumps(out).encode() + b"\n")
            os.read(self._release_r, 1)
            os._exit(0)
        os.close(res_w)
        os.close(self._release_r)
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(res_r, 1 << 16)
            assert chunk, "child died"
            data += chunk
        os.close(res_r)
        self.result = json.loads(data)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.write(self._release_w, b"x")
        os.close(self._release_w)
        os.waitpid(self.pid, 0)


def _requests(held: list[Any], path: str, requests: list[dict[str, Any]]) -> list[Any]:
    """Send ``requests`` on one connection; each answer, or "closed"."""
    conn = Raw(path)
    held.append(conn)
    answers: list[Any] = []
    for req in requests:
        try:
            conn.send(json.dumps({"jsonrpc": "2.0", "id": 1, **req}).encode())
            answers.append(conn.line())
        except (ConnectionError, OSError):
            answers.append("closed")
    return answers


def _open_many(held: list[Any], path: str, count: int) -> list[str]:
    """Open ``count`` connections, ask each for the version; "ok" or the error message for
    each. The admitted ones stay open (in ``held``)."""
    out = []
    for _ in range(count):
        conn = Raw(path, timeout=30)
        with contextlib.suppress(OSError):  # a refused peer may be closed already
            conn.send(b'{"jsonrpc":"2.0","id":1,"method":"query-version"}')
        try:
            msg = conn.line()
        except (ConnectionError, OSError):
            out.append("closed")
            conn.close()
            continue
        assert isinstance(msg, dict)
        if "result" in msg:
            out.append("ok")
            held.append(conn)
        else:
            assert msg["error"]["data"] == {"class": "GenericError"}
            out.append(msg["error"]["message"])
            conn.close()
    return out


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ramd-groups-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


ADD = {"method": "ram-block-add", "params": {"id": "b", "size": PAGE}}
QUERY = {"method": "query-ram-blocks"}
DELETE = {"method": "ram-block-del", "params": {"id": "a"}}
WRITE = {"method": "ram-block-write", "params": {"id": "a", "offset": 0, "data": "AA=="}}


def _denied(answer: Any) -> bool:
    return bool(answer["error"]["message"].startswith("Permission denied"))


def test_every_group_of_the_peer_counts(shared_dir: Path) -> None:
    cfg = (
        f'socket-mode = "0666"\nallow-uids = [0]\nallow-gids = [{ALLOW_GROUP}]\n'
        f"readonly-gids = [{RO_GROUP}]\n"
    )
    d = Daemon(shared_dir, cfg)
    path = str(d.path)
    try:
        with Raw(d.path) as root:
            root.call("ram-block-add", id="a", size=PAGE)
        # Allowed through a supplementary group only.
        with AsUser(4501, 4501, [ALLOW_GROUP], _requests, path, [ADD, QUERY]) as full:
            assert full.result[0]["result"]["id"] == "b"
        # A supplementary read-only group makes the peer read-only, whatever else it has.
        ro_requests = [QUERY, ADD, DELETE, WRITE]
        with AsUser(4502, 4502, [ALLOW_GROUP, RO_GROUP], _requests, path, ro_requests) as ro:
            assert [b["id"] for b in ro.result[0]["result"]] == ["a", "b"]
            assert all(_denied(a) for a in ro.result[1:])
        # newgrp: primary group switched from the read-only group to another of its groups.
        with AsUser(4503, ALLOW_GROUP, [RO_GROUP, ALLOW_GROUP], _requests, path, ro_requests) as ng:
            assert [b["id"] for b in ng.result[0]["result"]] == ["a", "b"]
            assert all(_denied(a) for a in ng.result[1:])
        # The primary group still counts on its own.
        with AsUser(4505, RO_GROUP, [], _requests, path, [QUERY, DELETE]) as primary:
            assert "result" in primary.result[0] and _denied(primary.result[1])
        # In no allowed group: refused at connect.
        with AsUser(4504, 4504, [4999], _requests, path, [QUERY]) as out:
            assert out.result[0] == "closed" or _denied(out.result[0])
        with Raw(d.path) as root:
            assert [b["id"] for b in root.call("query-ram-blocks")] == ["a", "b"]
    finally:
        assert d.stop() == 0


def test_non_root_peers_cannot_lock_root_out(shared_dir: Path) -> None:
    """Defaults: max-connections 256, max-connections-per-uid 64, 8 slots kept for root."""
    d = Daemon(shared_dir, 'socket-mode = "0666"\n')
    path = str(d.path)
    per_uid = "Limit exceeded: max-connections-per-uid is 64"
    total = "Limit exceeded: max-connections is 256 (the last 8 kept for uid 0)"
    try:
        with AsUser(4601, 4601, [], _open_many, path, 300) as greedy:
            assert greedy.result == ["ok"] * 64 + [per_uid] * 236
            with (
                AsUser(4602, 4602, [], _open_many, path, 64) as b,
                AsUser(4603, 4603, [], _open_many, path, 64) as c,
                AsUser(4604, 4604, [], _open_many, path, 64) as last,
            ):
                assert b.result == c.result == ["ok"] * 64
                assert last.result == ["ok"] * 56 + [total] * 8
                held: list[Raw] = []
                assert _open_many(held, path, 9) == ["ok"] * 8 + [
                    "Limit exceeded: max-connections is 256"
                ]
                assert held[0].call("query-stats")["limits"]["max-connections-per-uid"] == 64
                for conn in held:
                    conn.close()
        assert d.alive()
        # The slots come back once the peers are gone.
        for _ in range(200):
            held = []
            if _open_many(held, path, 1) == ["ok"]:
                held[0].close()
                break
        else:
            raise AssertionError("a freed slot was never reusable")
    finally:
        assert d.stop() == 0


def test_per_uid_share_is_configurable(shared_dir: Path) -> None:
    d = Daemon(shared_dir, 'socket-mode = "0666"\n[limits]\nmax-connections-per-uid = 2\n')
    try:
        with AsUser(4701, 4701, [], _open_many, str(d.path), 3) as peer:
            assert peer.result == ["ok", "ok", "Limit exceeded: max-connections-per-uid is 2"]
            # Root has no per-uid share.
            held: list[Raw] = []
            assert _open_many(held, str(d.path), 5) == ["ok"] * 5
            for conn in held:
                conn.close()
    finally:
        assert d.stop() == 0
