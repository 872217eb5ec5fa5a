"""The daemon process: start-up, configuration, socket ownership, signals, systemd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw

PAGE = 4096
RAMD = [sys.executable, "-m", "ramd"]


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError("daemon did not start")


def test_config_blocks_exist_at_start(start_daemon: Any) -> None:
    d = start_daemon(
        '[[block]]\nid = "ram0"\nsize = "64M"\nmax-size = "1G"\n'
        '[[block]]\nid = "fixed"\nsize = 8192\nprealloc = true\n'
    )
    with Raw(d.path) as rpc:
        blocks = rpc.call("query-ram-blocks")
    assert [(b["id"], b["size"], b["max-size"]) for b in blocks] == [
        ("ram0", 64 << 20, 1 << 30),
        ("fixed", 8192, 8192),
    ]
    assert "resident" not in blocks[1]


def test_sigterm_removes_socket_and_exits_0(start_daemon: Any) -> None:
    d = start_daemon()
    assert stat.S_IMODE(os.stat(d.path).st_mode) == 0o600
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="a", size=PAGE)
    assert d.stop(signal.SIGTERM) == 0
    assert not d.path.exists()


def test_sigint_exits_0(start_daemon: Any) -> None:
    d = start_daemon()
    assert d.stop(signal.SIGINT) == 0
    assert not d.path.exists()


def test_second_daemon_on_same_path_refuses(start_daemon: Any, tmp_path: Path) -> None:
    d = start_daemon()
    second = subprocess.run(
        [*RAMD, "--socket", str(d.path)], capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 1
    assert "already listening" in second.stderr and str(d.path) in second.stderr
    with Raw(d.path) as rpc:
        assert rpc.call("query-version")


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ramd.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    assert path.is_socket()
    proc = subprocess.Popen([*RAMD, "--socket", str(path)], stderr=subprocess.PIPE)
    try:
        _wait_socket(path, proc)
        with Raw(path) as rpc:
            assert rpc.call("query-version")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ('[limits]\nmax-blocks = "many"\n', "limits.max-blocks"),
        ('[[block]]\nid = "a"\nsize = "64Q"\n', "block[0].size"),
        ('[[block]]\nid = "9a"\nsize = "64M"\n', "block[0].id"),
        ('[[block]]\nid = "a"\nsize = "2M"\nmax-size = "1M"\n', "block[0]"),
        ('socket-mode = "999"\n', "socket-mode"),
        ("not toml [", "invalid TOML"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, config: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(config)
    res = subprocess.run(
        [*RAMD, "--socket", str(tmp_path / "s.sock"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2, res.stderr
    assert key in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "s.sock").exists()


def test_configured_socket_mode_and_path(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "r.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'socket = "{path}"\nsocket-mode = "0660"\n')
    proc = subprocess.Popen([*RAMD, "--config", str(cfg)])
    try:
        _wait_socket(path, proc)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_no_arguments_uses_default_path_rule(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAMD_SOCKET", "NOTIFY_SOCKET")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    proc = subprocess.Popen(RAMD, env=env)
    path = tmp_path / "ramd" / "ramd.sock"
    try:
        _wait_socket(path, proc)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    env["RAMD_SOCKET"] = str(tmp_path / "env.sock")
    proc = subprocess.Popen(RAMD, env=env)
    try:
        _wait_socket(tmp_path / "env.sock", proc)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_sd_notify_ready_after_listen_then_stopping(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    path = tmp_path / "r.sock"
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = subprocess.Popen([*RAMD, "--socket", str(path)], env=env)
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.split("\n")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
        assert "STATUS=" in msg
        proc.send_signal(signal.SIGTERM)
        msg = notify.recv(4096).decode()
        assert "STOPPING=1" in msg.split("\n")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_watchdog_pings(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="200000")
    proc = subprocess.Popen([*RAMD, "--socket", str(tmp_path / "r.sock")], env=env)
    try:
        seen = [notify.recv(4096).decode() for _ in range(4)]
        assert sum("WATCHDOG=1" in m for m in seen) >= 2
    finally:
        proc.terminate()
        proc.wait(20)
        notify.close()


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate missing"
)
def test_socket_activation_serves_inherited_socket_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "act.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    env.pop("RAMD_SOCKET", None)
    env["XDG_RUNTIME_DIR"] = str(tmp_path / "xdg")
    activate = ["systemd-socket-activate", "-l", str(path), "--fdname=jsonrpc"]
    activate += ["-E", "NOTIFY_SOCKET", "-E", "XDG_RUNTIME_DIR"]
    proc = subprocess.Popen([*activate, *RAMD], env=env)
    try:
        deadline = time.monotonic() + 10
        while True:  # the socket file exists from bind on; it accepts from listen on
            try:
                rpc = Raw(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                time.sleep(0.02)
        with rpc:
            rpc.call("ram-block-add", id="a", size=PAGE)
            assert [b["id"] for b in rpc.call("query-ram-blocks")] == ["a"]
        assert "READY=1" in notify.recv(4096).decode()
        assert not (tmp_path / "xdg" / "ramd" / "ramd.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        notify.close()
    assert path.exists(), "the daemon unlinked a socket it did not create"


def test_daemon_fixture_runs_the_requested_event_loop(daemon: Daemon) -> None:
    assert daemon.alive()
    assert daemon.stop() == 0
    loop = "uvloop" if "uvloop" in " ".join(map(str, daemon.proc.args)) else "asyncio"
    assert f"{loop} event loop" in daemon.log_text()


def test_uvloop_missing_is_a_usage_error(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['uvloop'] = None; from ramd.process.cli import main; "
        "sys.exit(main())"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "--socket", str(tmp_path / "s"), "--event-loop", "uvloop"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2 and "uvloop is not installed" in res.stderr


def test_sigterm_finishes_the_command_in_flight(start_daemon: Any) -> None:
    d = start_daemon()
    with Raw(d.path, timeout=60) as rpc, Raw(d.path) as probe:
        req = {"id": "big", "size": 2 << 30, "prealloc": True}
        rpc.send(
            b'{"jsonrpc":"2.0","method":"ram-block-add","params":'
            + json.dumps(req).encode()
            + b',"id":1}'
        )
        deadline = time.monotonic() + 10
        while "busy" not in json.dumps(probe.request("query-ram-blocks", id="big")):
            assert time.monotonic() < deadline, "the prealloc never started"
        d.proc.send_signal(signal.SIGTERM)
        answer = rpc.reply()
        assert answer["result"]["size"] == 2 << 30 and answer["result"]["prealloc"]
        with pytest.raises(ConnectionError):
            rpc.line()
    assert d.stop() == 0
    assert not d.path.exists()
