"""``ramctl`` as a subprocess against a real daemon: every command, exit codes, watch, I/O."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw
from ramctl_support import (
    PAGE,
    RAMCTL,
    Watch,
    env_without_socket,
    jok,
    ok,
    ramctl,
)

MiB = 1 << 20


# -- commands ----------------------------------------------------------------------------------


def test_console_script_is_installed(any_daemon: Daemon) -> None:
    script = Path(sys.executable).parent / "ramctl"
    if not script.exists():
        pytest.skip("no ramctl script next to this interpreter (not pip-installed)")
    p = subprocess.run(
        [str(script), "--socket", str(any_daemon.path), "version"], capture_output=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode().strip() == "ramd 0.1.0"


def test_add_list_info_resize_del_human(any_daemon: Daemon) -> None:
    s = any_daemon.path
    out = ok(s, "add", "ram0", "64M", "--max-size", "1.5G", "--merge", "--no-dump")
    assert "id:" in out and "ram0" in out
    assert "64 MiB (67108864)" in out and "1.5 GiB (1610612736)" in out
    ok(s, "add", "small", "6K", "--prealloc", "--lock")
    listing = ok(s, "list").splitlines()
    assert listing[0].split() == [
        "ID", "SIZE", "MAX-SIZE", "RESIDENT", "BACKEND", "MAPPERS", "PAGE", "OFFSET", "FLAGS"
    ]  # fmt: skip
    row = listing[1].split()
    assert row[0] == "ram0" and row[1:5] == ["64", "MiB", "1.5", "GiB"]
    assert row[7:9] == ["anonymous", "0"]
    assert row[-1] == "resizable,merge,nodump"
    assert listing[2].split()[0] == "small" and listing[2].split()[-1] == "prealloc,lock"
    info = ok(s, "info", "small")
    assert "size:" in info and "8 KiB (8192)" in info and "\nresizable:   no\n" in info
    assert "\nbackend:     anonymous\n" in info and "\npersistent:  no\n" in info
    assert "\nmappers:     0\n" in info
    resized = ok(s, "resize", "ram0", "128M")
    assert "128 MiB (134217728)" in resized
    assert ok(s, "del", "small") == "removed small\n"
    assert [line.split()[0] for line in ok(s, "list").splitlines()] == ["ID", "ram0"]


def test_json_outputs(any_daemon: Daemon) -> None:
    s = any_daemon.path
    block = jok(s, "add", "ram0", "1M", "--max-size", "16M", "--align", "2M")
    assert (block["id"], block["size"], block["max-size"], block["resizable"]) == (
        "ram0",
        MiB,
        16 * MiB,
        True,
    )
    assert block["host"] % (2 * MiB) == 0
    assert jok(s, "resize", "ram0", "3M")["size"] == 3 * MiB
    assert [b["id"] for b in jok(s, "list")] == ["ram0"]
    assert jok(s, "info", "ram0")["size"] == 3 * MiB
    assert jok(s, "discard", "ram0", "0", "4K") == {}
    stats = jok(s, "stats")
    assert stats["blocks"] == 1 and stats["limits"]["io-chunk"] > 0
    version = jok(s, "version")
    assert version["package"] == "ramd 0.1.0" and set(version["version"]) == {
        "major",
        "minor",
        "micro",
    }
    assert jok(s, "write", "ram0", "0", "-i", os.devnull) == {"written": 0}
    assert jok(s, "del", "ram0") == {"id": "ram0", "removed": True}
    assert jok(s, "list") == []


def test_stats_and_version_human(any_daemon: Daemon) -> None:
    ok(any_daemon.path, "add", "ram0", "2M")
    stats = ok(any_daemon.path, "stats")
    assert "blocks:" in stats and "used:" in stats and "2 MiB (2097152)" in stats
    assert "limits.io-chunk:" in stats and "limits.max-used:" in stats
    assert ok(any_daemon.path, "version").strip() == "ramd 0.1.0"


def test_discard_zeroes_the_range(any_daemon: Daemon) -> None:
    s = any_daemon.path
    ok(s, "add", "ram0", "16K")
    ok(s, "write", "ram0", "0", input=b"\xff" * (4 * PAGE))
    ok(s, "discard", "ram0", str(PAGE), str(PAGE))
    data = ramctl(s, "read", "ram0", "0", str(3 * PAGE)).stdout
    assert data == b"\xff" * PAGE + bytes(PAGE) + b"\xff" * PAGE


# -- exit codes --------------------------------------------------------------------------------


def test_refusal_exits_1_with_class_and_message(any_daemon: Daemon) -> None:
    s = any_daemon.path
    p = ramctl(s, "info", "ghost")
    assert p.returncode == 1 and p.stdout == b""
    assert p.stderr.decode() == "ramctl: DeviceNotFound: RAM block 'ghost' not found\n"
    ok(s, "add", "fixed", "1M")
    p = ramctl(s, "resize", "fixed", "2M")
    assert p.returncode == 1
    assert "GenericError: Size mismatch: fixed: 0x200000 != 0x100000: Invalid argument" in (
        p.stderr.decode()
    )
    p = ramctl(s, "add", "x", "0")
    assert p.returncode == 1
    assert "GenericError: size: Input should be greater than 0" in p.stderr.decode()
    p = ramctl(s, "write", "fixed", "1020K", input=b"x" * 8192)
    assert p.returncode == 1 and "GenericError" in p.stderr.decode()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["add", "ram0"],
        ["add", "ram0", "64X"],
        ["add", "ram0", "-1"],
        ["add", "ram0", "1M", "--max-size", "lots"],
        ["resize", "ram0"],
        ["read", "ram0", "0"],
        ["watch", "RAM_BLOCK_EXPLODED"],
        ["del", "ram0", "extra"],
    ],
)
def test_usage_errors_exit_2(any_daemon: Daemon, args: list[str]) -> None:
    p = ramctl(any_daemon.path, *args)
    assert p.returncode == 2, p
    assert b"usage:" in p.stderr


def test_no_daemon_exits_3_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.sock"
    p = ramctl(missing, "list")
    assert p.returncode == 3 and p.stdout == b""
    err = p.stderr.decode()
    assert str(missing) in err and "--socket" in err and "RAMD_SOCKET" in err
    # The default path rule: $RAMD_SOCKET, else $XDG_RUNTIME_DIR/ramd/ramd.sock.
    p = ramctl(None, "list", env=env_without_socket(RAMD_SOCKET=str(missing)))
    assert p.returncode == 3 and str(missing) in p.stderr.decode()
    p = ramctl(None, "list", env=env_without_socket(XDG_RUNTIME_DIR=str(tmp_path)))
    assert p.returncode == 3 and str(tmp_path / "ramd" / "ramd.sock") in p.stderr.decode()


def test_default_socket_from_environment(any_daemon: Daemon) -> None:
    p = ramctl(None, "version", env=env_without_socket(RAMD_SOCKET=str(any_daemon.path)))
    assert p.returncode == 0 and p.stdout.decode().strip() == "ramd 0.1.0"


# -- read / write ------------------------------------------------------------------------------


def test_read_write_64mib_round_trip_through_pipes(reused_daemon: Daemon) -> None:
    s = reused_daemon.path
    ok(s, "add", "ram0", "64M", "--max-size", "128M")
    data = os.urandom(64 * MiB)
    out = ok(s, "write", "ram0", "0", input=data)
    assert "67108864 bytes" in out
    p = ramctl(s, "read", "ram0", "0", "64M")
    assert p.returncode == 0 and p.stderr == b""  # no progress bar: stderr is not a terminal
    assert len(p.stdout) == len(data) and p.stdout == data
    # An unaligned window in the middle, in both directions.
    p = ramctl(s, "read", "ram0", "12345", "40000000")
    assert p.stdout == data[12345 : 12345 + 40_000_000]


def test_read_write_64mib_through_files_under_tight_limits(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Chunks must fit both io-chunk and, as base64, max-message-size: any larger request
    would be refused, so the round trip proves the chunking."""
    d = start_daemon('[limits]\nio-chunk = "1M"\nmax-message-size = "512K"\n')
    s = d.path
    ok(s, "add", "ram0", "65M")
    data = os.urandom(64 * MiB)
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    ok(s, "write", "ram0", "1M", "-i", str(src))
    assert ok(s, "read", "ram0", "1M", "64M", "-o", str(dst)) == ""
    assert dst.read_bytes() == data
    with Raw(s) as raw:
        head = raw.call("ram-block-read", id="ram0", offset=0, length=4096)
    assert head["data"] == "A" * 5460 + "AA=="  # the first MiB was left alone (zeros)


def test_progress_bar_only_on_a_terminal(any_daemon: Daemon, tmp_path: Path) -> None:
    ok(any_daemon.path, "add", "ram0", "32M")
    master, slave = pty.openpty()
    # A fresh pty is 0x0 characters, which leaves tqdm no room to draw in.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    out = tmp_path / "out.bin"
    shown = b""
    try:
        proc = subprocess.Popen(
            [*RAMCTL, "--socket", str(any_daemon.path), "read", "ram0", "0", "32M", "-o", str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        slave = -1
        while True:  # until the child is gone and the pty drained (EIO)
            if not select.select([master], [], [], 60)[0]:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(60) == 0
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    assert out.stat().st_size == 32 * MiB
    assert b"read ram0" in shown and b"B/s" in shown


def test_read_refuses_a_terminal_stdout(any_daemon: Daemon) -> None:
    ok(any_daemon.path, "add", "ram0", "1M")
    master, slave = pty.openpty()
    try:
        p = subprocess.run(
            [*RAMCTL, "--socket", str(any_daemon.path), "read", "ram0", "0", "4K"],
            stdout=slave,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 2 and b"-o FILE" in p.stderr


# -- watch ---------------------------------------------------------------------------------------


@pytest.fixture
def watch(daemon: Daemon) -> Iterator[Callable[..., Watch]]:
    started: list[Watch] = []

    def start(*args: str) -> Watch:
        w = Watch(daemon.path, *args)
        started.append(w)
        with Raw(daemon.path) as raw:  # wait until it is subscribed
            deadline = time.monotonic() + 20
            while raw.call("query-stats")["subscribers"] < len(started):
                assert w.proc.poll() is None, w.stop_and_stderr()
                assert time.monotonic() < deadline, "watch never subscribed"
                time.sleep(0.02)
        return w

    yield start
    for w in started:
        w.close()


def test_watch_prints_each_event_as_it_happens(daemon: Daemon, watch: Callable[..., Watch]) -> None:
    w = watch("watch")
    with Raw(daemon.path) as raw:
        raw.call("ram-block-add", id="ram0", size=MiB, **{"max-size": 8 * MiB})
        line = w.line()
        assert line.split()[1:4] == ["RAM_BLOCK_ADDED", "seq=1", "id=ram0"]
        assert "size=1 MiB" in line and "max-size=8 MiB" in line and "(replay)" not in line
        assert w.no_line()  # nothing more until the next change
        raw.call("ram-block-resize", id="ram0", size=2 * MiB)
        line = w.line()
        assert line.split()[1:4] == ["RAM_BLOCK_RESIZED", "seq=2", "id=ram0"]
        assert "old-size=1 MiB" in line and "new-size=2 MiB" in line
        raw.call("ram-block-del", id="ram0")
        assert w.line().split()[1:4] == ["RAM_BLOCK_REMOVED", "seq=3", "id=ram0"]
    assert w.interrupt() == 0
    assert w.stop_and_stderr() == ""


def test_watch_json_with_replay_and_filter(daemon: Daemon, watch: Callable[..., Watch]) -> None:
    with Raw(daemon.path) as raw:
        raw.call("ram-block-add", id="old", size=MiB)
        w = watch("--json", "watch", "--replay", "RAM_BLOCK_ADDED", "RAM_BLOCK_REMOVED")
        replayed = json.loads(w.line())
        assert replayed["event"] == "RAM_BLOCK_ADDED"
        assert replayed["data"]["id"] == "old" and replayed["data"]["replay"] is True
        assert set(replayed["timestamp"]) == {"seconds", "microseconds"}
        raw.call("ram-block-add", id="new", size=MiB, **{"max-size": 2 * MiB})
        raw.call("ram-block-resize", id="new", size=2 * MiB)  # filtered out
        raw.call("ram-block-del", id="old")
        lines = [json.loads(w.line()) for _ in range(2)]
    assert [(e["event"], e["data"]["id"], e["data"]["seq"]) for e in lines] == [
        ("RAM_BLOCK_ADDED", "new", 2),
        ("RAM_BLOCK_REMOVED", "old", 4),
    ]
    assert w.interrupt() == 0


def test_watch_exits_3_when_the_daemon_goes_away(
    daemon: Daemon, watch: Callable[..., Watch]
) -> None:
    w = watch("watch")
    daemon.stop()
    assert w.proc.wait(20) == 3
    assert "lost the connection" in w.stop_and_stderr()


def test_a_connection_the_daemon_refuses_is_exit_1_with_its_message(start_daemon: Any) -> None:
    d = start_daemon("[limits]\nmax-connections = 1\n")
    while True:  # until the start-up probe has gone and this connection holds the one slot
        held = Raw(d.path)
        held.send(b'{"jsonrpc":"2.0","method":"query-version","id":1}')
        if "result" in held.reply():
            break
        held.close()
    with held:
        p = ramctl(d.path, "version")
    assert p.returncode == 1, p.stderr
    assert "GenericError: Limit exceeded: max-connections is 1" in p.stderr.decode()
    assert ok(d.path, "version")
