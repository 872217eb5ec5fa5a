"""``ramctl`` on shared blocks: ``add --backend``, ``map`` (a real subprocess, interrupted
with SIGINT) and ``read``/``write`` through the mapping."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

from daemon import Daemon, Raw
from ramctl_support import RAMCTL, MiB, jok, ramctl


def _line(proc: subprocess.Popen[bytes], stream: str, timeout: float = 60) -> bytes:
    pipe = getattr(proc, stream)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([pipe], [], [], 0.5)[0]:
            return bytes(pipe.readline())
    raise AssertionError(f"no line on {stream} within {timeout} s")


def test_add_a_shared_block(reused_shared_daemon: Daemon) -> None:
    info = jok(
        reused_shared_daemon.path, "add", "m", "1M", "--backend", "memfd", "--max-size", "4M"
    )
    assert (info["backend"], info["shared"], info["max-size"]) == ("memfd", True, 4 * MiB)
    assert jok(reused_shared_daemon.path, "add", "f", "64K", "--backend", "file")["path"]
    p = ramctl(reused_shared_daemon.path, "add", "x", "1M", "--backend", "bogus")
    assert p.returncode == 2 and b"invalid choice" in p.stderr


def test_map_prints_and_acknowledges_events_until_interrupted(reused_shared_daemon: Daemon) -> None:
    with Raw(reused_shared_daemon.path) as rpc:
        rpc.call("ram-block-add", id="m", size=MiB, backend="memfd", **{"max-size": 8 * MiB})
        proc = subprocess.Popen(
            [*RAMCTL, "--socket", str(reused_shared_daemon.path), "--json", "map", "m"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            mapped = json.loads(_line(proc, "stderr"))
            assert (mapped["mapped"], mapped["size"], mapped["mode"]) == ("m", MiB, "read-write")
            assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 1
            rpc.call("ram-block-resize", id="m", size=4 * MiB)
            grow = json.loads(_line(proc, "stdout"))
            # Answered only after ramctl re-reserved the tail and acknowledged.
            assert rpc.call("ram-block-resize", id="m", size=2 * MiB)["size"] == 2 * MiB
            shrink = json.loads(_line(proc, "stdout"))
            assert grow["event"] == shrink["event"] == "RAM_BLOCK_RESIZED"
            assert (grow["data"]["new-size"], grow["data"]["ack"]) == (4 * MiB, False)
            assert (shrink["data"]["new-size"], shrink["data"]["ack"]) == (2 * MiB, True)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
            assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 0
        finally:
            proc.kill()
            proc.wait()


def test_map_ends_when_the_block_is_removed(reused_shared_daemon: Daemon) -> None:
    with Raw(reused_shared_daemon.path) as rpc:
        rpc.call("ram-block-add", id="m", size=MiB, backend="file")
        proc = subprocess.Popen(
            [*RAMCTL, "--socket", str(reused_shared_daemon.path), "map", "m"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert b"mapped m: 1 MiB of 1 MiB" in _line(proc, "stderr")
            assert rpc.call("ram-block-del", id="m") == {}
            assert b"RAM_BLOCK_REMOVED" in _line(proc, "stdout")
            assert proc.wait(60) == 0
            assert b"m was removed" in _line(proc, "stderr")
        finally:
            proc.kill()
            proc.wait()


def test_map_of_an_anonymous_block_is_refused(reused_shared_daemon: Daemon) -> None:
    jok(reused_shared_daemon.path, "add", "a", "64K")
    p = ramctl(reused_shared_daemon.path, "map", "a")
    assert p.returncode == 1
    assert b"RAM block 'a' is not shared (backend anonymous)" in p.stderr


def test_write_and_read_64_mib_through_the_mapping(
    reused_shared_daemon: Daemon, tmp_path: Path
) -> None:
    data = os.urandom(64 * MiB)
    src, dst = os.path.join(tmp_path, "in"), os.path.join(tmp_path, "out")
    with open(src, "wb") as f:
        f.write(data)
    jok(reused_shared_daemon.path, "add", "m", "65M", "--backend", "memfd")
    written = jok(reused_shared_daemon.path, "write", "m", "1M", "-i", src)
    assert written == {"written": 64 * MiB}
    assert jok(reused_shared_daemon.path, "read", "m", "1M", "64M", "-o", dst) == {"read": 64 * MiB}
    with open(dst, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    with Raw(reused_shared_daemon.path) as rpc:  # the daemon's own view agrees (pread on its fd)
        got = rpc.call("ram-block-read", id="m", offset=MiB + 12345, length=100)
    assert base64.b64decode(got["data"]) == data[12345:12445]
    p = ramctl(reused_shared_daemon.path, "read", "m", "64M", "2M", "-o", dst)
    assert p.returncode == 1 and b"Range out of bounds" in p.stderr
    p = ramctl(reused_shared_daemon.path, "write", "m", "64M", "-i", src)
    assert p.returncode == 1 and b"Range out of bounds" in p.stderr
