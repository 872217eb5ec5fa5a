"""systemd integration without libsystemd: sd_notify datagrams, LISTEN_FDS, the watchdog interval.

Inherited fds are tested in a child process, since they must sit at fd 3 and up and
``LISTEN_PID`` must be the pid of the process that reads them: a trampoline moves the
sockets to 3, 4, ..., sets ``LISTEN_PID`` to its own pid and execs the reporter (exec keeps the
pid), exactly as the service manager does.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ramd
from ramd.process import systemd

PROJECT_ROOT = Path(ramd.__file__).resolve().parents[1]
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# --------------------------------------------------------------------------- notify


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No systemd variable leaks in from the environment pytest runs in."""
    for name in (*LISTEN_VARS, "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_notify_sends_the_message_to_a_path_socket(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify")
    with _receiver(path) as receiver:
        clean_env.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1\nSTATUS=serving 2 blocks") is True
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 2 blocks"


def test_notify_uses_the_abstract_namespace_for_an_at_sign(clean_env: pytest.MonkeyPatch) -> None:
    name = f"ramd-test-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as receiver:
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("WATCHDOG=1") is True
        assert receiver.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("value", [None, ""])
def test_notify_is_a_no_op_without_notify_socket(
    clean_env: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is not None:
        clean_env.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False


def test_notify_ignores_an_unsupported_address(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


def test_notify_does_not_raise_when_nobody_listens(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "missing"))
    assert systemd.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", f"@ramd-test-nobody-{uuid.uuid4().hex}")
    assert systemd.notify("READY=1") is False


def test_notify_does_not_raise_when_the_socket_is_a_stream(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = str(tmp_path / "stream")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        clean_env.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1") is False


def test_notify_refuses_an_empty_message(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        systemd.notify("")


# --------------------------------------------------------------------------- listen_fds in-process


def test_listen_fds_without_variables_is_empty(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.listen_fds() == []


def test_listen_fds_meant_for_another_pid_are_ignored_and_unset(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "2")
    clean_env.setenv("LISTEN_FDNAMES", "jsonrpc:qmp")
    assert systemd.listen_fds() == []
    assert all(name not in os.environ for name in LISTEN_VARS)


def test_listen_fds_keeps_the_variables_when_asked(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_env.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "1"


def test_listen_fds_zero_is_empty(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_env.setenv("LISTEN_FDS", "0")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


@pytest.mark.parametrize(
    ("pid", "fds"),
    [("abc", "1"), ("-1", "1"), ("0", "1"), ("self", "x"), ("self", "-2"), ("self", "9" * 30)],
)
def test_listen_fds_refuses_malformed_numbers_and_still_unsets(
    clean_env: pytest.MonkeyPatch, pid: str, fds: str
) -> None:
    clean_env.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    clean_env.setenv("LISTEN_FDS", fds)
    with pytest.raises(ValueError, match="LISTEN_"):
        systemd.listen_fds()
    assert all(name not in os.environ for name in LISTEN_VARS)


# --------------------------------------------------------------------------- listen_fds for real

REPORTER = """
import fcntl, json, os, socket, sys
from ramd.process.systemd import listen_fds
unset = sys.argv[1] == "unset"
try:
    pairs = listen_fds(unset_environment=unset)
except OSError as exc:
    print(json.dumps({"error": exc.errno}))
    raise SystemExit(0)

def describe(fd):
    sock = socket.socket(fileno=fd)
    try:
        address = sock.getsockname()
    finally:
        sock.detach()
    cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    return {"address": address, "cloexec": cloexec}

print(json.dumps({
    "pid": os.getpid(),
    "pairs": [[fd, name] for fd, name in pairs],
    "fds": {fd: describe(fd) for fd in range(3, 3 + int(sys.argv[2]))},
    "env": {name: os.environ.get(name) for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
}))
"""

TRAMPOLINE = """
import fcntl, json, os, sys
spec = json.loads(sys.argv[1])
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in spec["fds"]]
for fd in spec["fds"]:
    os.close(fd)
os.closerange(3, 100)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)
    os.close(fd)
env = dict(os.environ, **spec["env"])
env["LISTEN_PID"] = str(os.getpid() + spec["pid_offset"])
os.execve(sys.executable, [sys.executable, "-c", spec["reporter"], spec["unset"],
                           str(len(high))], env)
"""


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[list[socket.socket]]:
    """Three listening Unix sockets, named by their position: ``tmp/s0``, ``tmp/s1``, ``tmp/s2``."""
    socks = []
    for index in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / f"s{index}"))
        sock.listen()
        socks.append(sock)
    yield socks
    for sock in socks:
        sock.close()


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*LISTEN_VARS, "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def _activate(
    socks: list[socket.socket],
    env: dict[str, str],
    *,
    pid_offset: int = 0,
    unset: bool = True,
) -> dict[str, Any]:
    """Pass ``socks`` as fds 3.. to a reporter child with ``env``; return what it saw."""
    fds = [sock.fileno() for sock in socks]
    spec = {
        "fds": fds,
        "env": env,
        "pid_offset": pid_offset,
        "reporter": REPORTER,
        "unset": "unset" if unset else "keep",
    }
    proc = subprocess.run(
        [sys.executable, "-c", TRAMPOLINE, json.dumps(spec)],
        pass_fds=fds,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert proc.stderr == ""
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_listen_fds_returns_named_inherited_sockets_and_unsets_the_environment(
    listeners: list[socket.socket], tmp_path: Path
) -> None:
    seen = _activate(listeners[:2], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "jsonrpc:qmp"})
    assert seen["pairs"] == [[3, "jsonrpc"], [4, "qmp"]]
    assert seen["fds"] == {
        "3": {"address": str(tmp_path / "s0"), "cloexec": True},
        "4": {"address": str(tmp_path / "s1"), "cloexec": True},
    }
    assert seen["env"] == dict.fromkeys(LISTEN_VARS)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (None, ["unknown", "unknown", "unknown"]),
        ("jsonrpc", ["jsonrpc", "unknown", "unknown"]),
        ("::qmp", ["unknown", "unknown", "qmp"]),
        ("a:b:c:extra", ["a", "b", "c"]),
    ],
)
def test_listen_fds_names_missing_ones_unknown(
    listeners: list[socket.socket], names: str | None, expected: list[str]
) -> None:
    env = {"LISTEN_FDS": "3"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    seen = _activate(listeners, env)
    assert seen["pairs"] == [[3 + i, name] for i, name in enumerate(expected)]


def test_listen_fds_keeps_the_environment_when_asked(listeners: list[socket.socket]) -> None:
    seen = _activate(listeners[:1], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "qmp"}, unset=False)
    assert seen["pairs"] == [[3, "qmp"]]
    assert seen["env"] == {
        "LISTEN_PID": str(seen["pid"]),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "qmp",
    }


def test_listen_fds_of_another_pid_leaves_the_fds_untouched(
    listeners: list[socket.socket],
) -> None:
    seen = _activate(listeners[:1], {"LISTEN_FDS": "1"}, pid_offset=1)
    assert seen["pairs"] == []
    assert seen["fds"]["3"]["cloexec"] is False
    assert seen["env"] == dict.fromkeys(LISTEN_VARS)


def test_listen_fds_reports_an_announced_fd_that_is_not_open(
    listeners: list[socket.socket],
) -> None:
    seen = _activate(listeners[:1], {"LISTEN_FDS": "2"})
    assert seen == {"error": 9}  # EBADF for fd 4


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
def test_listen_fds_under_systemd_socket_activate(tmp_path: Path) -> None:
    """The real tool sets LISTEN_* and starts the reporter on the first connection."""
    path = tmp_path / "activated.sock"
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            f"--listen={path}",
            "--fdname=jsonrpc",
            sys.executable,
            "-c",
            REPORTER,
            "unset",
            "1",
        ],
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            # the socket file exists from bind on; it accepts from listen on
            while True:
                try:
                    client.connect(str(path))
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
                    time.sleep(0.01)
            out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seen = json.loads(out)
    assert seen["pairs"] == [[3, "jsonrpc"]]
    assert seen["fds"]["3"] == {"address": str(path), "cloexec": True}
    assert seen["env"] == dict.fromkeys(LISTEN_VARS)


# --------------------------------------------------------------------------- watchdog


def test_watchdog_is_off_without_watchdog_usec(clean_env: pytest.MonkeyPatch) -> None:
    assert systemd.watchdog_interval() is None


def test_watchdog_pings_at_half_the_timeout(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0


def test_watchdog_meant_for_another_pid_is_off(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize(("usec", "pid"), [("abc", None), ("0", None), ("-5", None), ("1", "x")])
def test_watchdog_refuses_malformed_values(
    clean_env: pytest.MonkeyPatch, usec: str, pid: str | None
) -> None:
    clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_env.setenv("WATCHDOG_PID", pid)
    with pytest.raises(ValueError, match="WATCHDOG_"):
        systemd.watchdog_interval()
