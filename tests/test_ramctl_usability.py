"""``ramctl`` as a user meets it (issue 15): hex sizes, timeouts, JSON errors, ``call``,
``del``, ``stats``, ``watch --reconnect`` and SIGINT, the progress label, help texts and a
start-up that imports no pydantic. Real daemon, real ``ramctl`` subprocess."""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
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
from ramctl_support import RAMCTL, Watch, jok, ok, ramctl
from ramd_client.cli_parser import build_parser as ramctl_parser

from ramd.process.cli import build_parser as ramd_parser

MiB = 1 << 20


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    """One daemon on the default event loop: these tests are about ramctl, not the loop."""
    return start_daemon()


def json_error(p: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The one JSON error object ``ramctl --json`` printed on stderr."""
    assert p.stdout == b""
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    doc = json.loads(lines[0])
    assert set(doc) == {"error"}
    return doc["error"]  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- sizes, options, output ------------------------------------------------------------------


def test_offsets_and_sizes_in_hex_as_ramctl_prints_them(any_daemon: Daemon) -> None:
    s = any_daemon.path
    assert jok(s, "add", "ram0", "0x100000", "--max-size", "0x400000")["max-size"] == 4 * MiB
    ok(s, "write", "ram0", "0x10", input=b"0123456789abcdef")
    p = ramctl(s, "read", "ram0", "0x10", "0x10")
    assert p.returncode == 0 and p.stdout == b"0123456789abcdef"
    assert ramctl(s, "read", "ram0", "0X18", "8").stdout == b"89abcdef"
    ok(s, "discard", "ram0", "0x0", "4K")
    assert ramctl(s, "read", "ram0", "0x10", "16").stdout == bytes(16)
    assert jok(s, "resize", "ram0", "0x200000")["size"] == 2 * MiB
    p = ramctl(s, "read", "ram0", "0x", "1")
    assert p.returncode == 2 and b"invalid size '0x'" in p.stderr


def test_global_options_after_the_command(any_daemon: Daemon) -> None:
    ok(any_daemon.path, "add", "ram0", "1M")
    p = ramctl(None, "list", "--json", "--socket", str(any_daemon.path), "--timeout", "30")
    assert p.returncode == 0, p.stderr
    assert [b["id"] for b in json.loads(p.stdout)] == ["ram0"]
    # After the command wins over before it.
    p = ramctl("/nonexistent.sock", "info", "ram0", "--socket", str(any_daemon.path), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["id"] == "ram0"


def test_errors_are_json_under_json(any_daemon: Daemon, tmp_path: Path) -> None:
    p = ramctl(any_daemon.path, "--json", "info", "ghost")
    assert p.returncode == 1
    assert json_error(p) == {
        "class": "DeviceNotFound",
        "desc": "RAM block 'ghost' not found",
        "status": 1,
    }
    p = ramctl(any_daemon.path, "add", "x", "0", "--json")
    error = json_error(p)
    assert p.returncode == 1 and error["code"] == -32602 and error["class"] == "GenericError"
    p = ramctl(any_daemon.path, "add", "x", "--json")
    assert p.returncode == 2 and json_error(p)["class"] == "UsageError"
    missing = tmp_path / "none.sock"
    p = ramctl(missing, "--json", "list")
    error = json_error(p)
    assert p.returncode == 3 and error["class"] == "ConnectError"
    assert error["socket"] == str(missing) and "RAMD_SOCKET" in error["hints"][0]


def test_call_sends_any_command_raw(any_daemon: Daemon) -> None:
    s = any_daemon.path
    ok(s, "add", "ram0", "1M")
    blocks = json.loads(ok(s, "call", "query-ram-blocks", '{"id": "ram0"}'))
    assert [b["id"] for b in blocks] == ["ram0"] and blocks[0]["size"] == MiB
    assert json.loads(ok(s, "call", "query-version"))["package"] == "ramd 0.1.0"
    p = ramctl(s, "call", "ram-block-resize", "-", input=b'{"id": "ram0", "size": 4096}')
    assert p.returncode == 1 and b"Size mismatch" in p.stderr
    p = ramctl(s, "call", "no-such-command")
    assert p.returncode == 1 and p.stderr.startswith(b"ramctl: CommandNotFound: ")
    for bad in ("[1]", "{"):
        p = ramctl(s, "call", "query-ram-blocks", bad)
        assert p.returncode == 2 and b"PARAMS" in p.stderr


def test_del_says_what_it_did_and_if_exists(any_daemon: Daemon) -> None:
    s = any_daemon.path
    ok(s, "add", "ram0", "1M")
    assert ok(s, "del", "ram0") == "removed ram0\n"
    p = ramctl(s, "del", "ram0")
    assert p.returncode == 1 and b"DeviceNotFound" in p.stderr
    assert ok(s, "del", "ram0", "--if-exists") == "no block ram0: nothing removed\n"
    assert jok(s, "del", "--if-exists", "ram0") == {"id": "ram0", "removed": False}


def test_stats_shows_dropped_subscribers(daemon: Daemon) -> None:
    assert re.search(r"^dropped-subscribers: +0$", ok(daemon.path, "stats"), re.MULTILINE)
    assert jok(daemon.path, "stats")["dropped-subscribers"] == 0


def test_resizing_a_fixed_block_keeps_qemus_text_and_adds_a_hint(any_daemon: Daemon) -> None:
    ok(any_daemon.path, "add", "fixed", "1M")
    p = ramctl(any_daemon.path, "resize", "fixed", "2M")
    assert p.returncode == 1
    assert p.stderr.decode().splitlines() == [
        "ramctl: GenericError: Size mismatch: fixed: 0x200000 != 0x100000: Invalid argument"
        " (2 MiB != 1 MiB)",
        "ramctl: fixed is not resizable: only a block created with --max-size can change size",
    ]
    p = ramctl(any_daemon.path, "--json", "resize", "fixed", "2M")
    assert "--max-size" in json_error(p)["hints"][0]
    # JSON keeps the daemon's message as the protocol fixes it
    assert json_error(p)["desc"] == "Size mismatch: fixed: 0x200000 != 0x100000: Invalid argument"


# -- read ----------------------------------------------------------------------------------------


def test_read_past_the_end_names_the_range_and_leaves_no_file(
    any_daemon: Daemon, tmp_path: Path
) -> None:
    s = any_daemon.path
    ok(s, "add", "ram0", "64M")
    out = tmp_path / "out.bin"
    p = ramctl(s, "read", "ram0", "0", "65M", "-o", str(out))
    assert p.returncode == 1
    assert p.stderr.decode() == (
        "ramctl: GenericError: Range out of bounds: ram0: offset 0x0 length 0x4100000 "
        "exceeds size 0x4000000 (offset 0 B length 65 MiB exceeds size 64 MiB)\n"
    )
    assert not out.exists()
    out.write_bytes(b"old contents")
    out.chmod(0o640)
    assert ramctl(s, "read", "ram0", "0x3ff0000", "0x20000", "-o", str(out)).returncode == 1
    assert out.read_bytes() == b"old contents"
    ok(s, "write", "ram0", "0", input=b"new")
    assert ok(s, "read", "ram0", "0", "3", "-o", str(out)) == ""
    assert out.read_bytes() == b"new" and out.stat().st_mode & 0o777 == 0o640
    assert sorted(f.name for f in tmp_path.iterdir() if f.name.startswith(".out.bin")) == []


def test_progress_label_is_binary_units(any_daemon: Daemon, tmp_path: Path) -> None:
    # large enough that the bar is redrawn with a rate before the read ends (a 64 MiB read
    # could end before tqdm's first refresh, showing 0% and no rate)
    ok(any_daemon.path, "add", "ram0", "1G")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    shown = b""
    try:
        proc = subprocess.Popen(
            [*RAMCTL, "--socket", str(any_daemon.path), "read", "ram0", "0", "1G", "-o", "x.bin"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        slave = -1
        while select.select([master], [], [], 60)[0]:
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
    assert re.search(rb"read ram0: +\d+%\|", shown), shown
    assert re.search(rb"/1 GiB \[", shown), shown
    assert re.search(rb"\d (B|[KMG]iB)/s\]", shown), shown
    assert b"MB/s" not in shown and b"kB/s" not in shown


# -- timeouts ------------------------------------------------------------------------------------


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[Path]:
    """A Unix socket that listens but never accepts: connect() succeeds, nothing answers."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(8)
        yield path


def test_a_socket_that_never_answers_times_out(silent_socket: Path) -> None:
    p = ramctl(silent_socket, "--timeout", "1", "list")
    assert p.returncode == 3
    assert p.stderr.decode() == (
        f"ramctl: cannot connect to ramd at {silent_socket}: no answer within 1 s\n"
    )
    # The default timeout (10 s) applies without the option: ramctl never waits forever.
    p = ramctl(silent_socket, "version", timeout=120)
    assert p.returncode == 3 and b"no answer within 10 s" in p.stderr


def test_a_stopped_daemon_times_out_connecting_and_mid_transfer(daemon: Daemon) -> None:
    s = daemon.path
    ok(s, "add", "ram0", "256M")
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        p = ramctl(s, "--timeout", "1", "version")
        assert p.returncode == 3 and b"no answer within 1 s" in p.stderr
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    # Connected, then the daemon stops while ramctl is writing: the next call times out and
    # ramctl exits without waiting to flush what it had queued for the stopped daemon.
    proc = subprocess.Popen(
        [*RAMCTL, "--socket", str(s), "--timeout", "2", "write", "ram0", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        bufsize=0,  # a write to the pipe ramctl closed fails once, not again at close()
    )
    assert proc.stdin is not None and proc.stderr is not None
    first = os.urandom(8 * MiB)
    proc.stdin.write(first)
    with Raw(s) as raw:  # mid-transfer for sure: the first chunk has landed

        def landed() -> bool:
            got = raw.call("ram-block-read", id="ram0", offset=0, length=16)["data"]
            return bool(base64.b64decode(got) == first[:16])

        wait_for(landed, "ramctl's first chunk")
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        with proc.stdin, contextlib.suppress(BrokenPipeError):
            proc.stdin.write(os.urandom(56 * MiB))
        assert proc.wait(60) == 3
        err = proc.stderr.read().decode()
        assert re.fullmatch(
            r"ramctl: ram-block-write: no answer from ramd within 2 s \(at .*\)\n"
            r"ramctl: the daemon may still complete ram-block-write: it is not cancelled; "
            r"check with `ramctl info ram0`\n"
            r"ramctl: wait longer with --timeout SECONDS \(0: no limit\)\n",
            err,
        ), err
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        proc.stderr.close()
    assert daemon.alive()


def test_permission_denied_is_not_asked_whether_ramd_runs(tmp_path: Path) -> None:
    path = tmp_path / "locked.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen(1)
        path.chmod(0)
        cmd = [*RAMCTL, "--socket", str(path), "list"]
        if os.geteuid() == 0:  # root passes file modes: drop the capabilities that allow it
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot be denied permission")
            caps = "-dac_override,-dac_read_search"
            cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
        p = subprocess.run(cmd, capture_output=True, timeout=60)
    assert p.returncode == 3
    assert p.stderr.decode() == f"ramctl: cannot connect to ramd at {path}: Permission denied\n"


# -- watch ---------------------------------------------------------------------------------------


def subscribers(path: Path) -> int:
    with Raw(path) as raw:
        return int(raw.call("query-stats")["subscribers"])


def test_watch_stops_on_sigint_even_when_started_with_it_ignored(daemon: Daemon) -> None:
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    w = Watch(daemon.path, "watch", preexec_fn=ignore_sigint)
    try:
        wait_for(lambda: subscribers(daemon.path) == 1, "watch to subscribe")
        with Raw(daemon.path) as raw:
            raw.call("ram-block-add", id="ram0", size=MiB)
        assert "RAM_BLOCK_ADDED seq=1 id=ram0" in w.line(30)
        assert w.interrupt() == 0
        assert w.stop_and_stderr() == ""
    finally:
        w.close()


def test_watch_reconnect_reports_the_changes_and_goes_on(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    first = start_daemon()
    with Raw(first.path) as raw:
        raw.call("ram-block-add", id="kept", size=MiB)
        raw.call("ram-block-add", id="gone", size=MiB)
    errors = tmp_path / "watch.err"
    with open(errors, "wb") as err:
        w = Watch(first.path, "watch", "--reconnect", "--replay", "--timeout", "30", stderr=err)
    try:
        assert [w.line(30).split()[3] for _ in range(2)] == ["id=kept", "id=gone"]
        wait_for(lambda: subscribers(first.path) == 1, "watch to subscribe")
        assert first.stop() == 0
        assert w.proc.poll() is None  # still there, waiting for a daemon
        # "kept" comes back as another block (resizable now): its contents are not the same.
        second = start_daemon(
            '[[block]]\nid = "kept"\nsize = "1M"\nmax-size = "2M"\n'
            '[[block]]\nid = "new"\nsize = "2M"\n'
        )
        wait_for(lambda: "reconnected" in errors.read_text(), "watch to reconnect")
        notes = errors.read_text().splitlines()
        assert len(notes) == 2 and f"reconnecting to {first.path}" in notes[0]
        assert re.fullmatch(
            rf"ramctl: reconnected to {second.path} at seq \d+: "
            "added new; removed gone; replaced kept",
            notes[1],
        ), notes
        with Raw(second.path) as raw:
            raw.call("ram-block-del", id="new")
        line = w.line(30).split()
        assert (line[1], line[3]) == ("RAM_BLOCK_REMOVED", "id=new")
        assert w.interrupt() == 0
    finally:
        w.close()


# -- help and start-up ---------------------------------------------------------------------------


def test_every_argument_has_help() -> None:
    for parser in (ramctl_parser(), ramd_parser()):
        stack = [parser]
        while stack:
            p = stack.pop()
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
                    continue
                assert action.help, f"{p.prog}: {action.dest} has no help"
    text = subprocess.run(
        [sys.executable, "-m", "ramd", "--help"], capture_output=True, check=True, timeout=60
    ).stdout.decode()
    assert "least severe messages logged" in text and "one JSON object per line" in text


def test_version_imports_neither_asyncio_nor_pydantic(any_daemon: Daemon) -> None:
    """``ramctl version`` starts fast: it does its one exchange with a blocking socket."""
    probe = (
        "import sys\n"
        "from ramd_client.cli import main\n"
        f"status = main(['--socket', {str(any_daemon.path)!r}, 'version'])\n"
        "heavy = ('asyncio', 'pydantic', 'tqdm', 'logging')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(status, heavy)\n"
    )
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True, timeout=60)
    assert p.stdout.decode().splitlines() == ["ramd 0.1.0", "0 []"]
