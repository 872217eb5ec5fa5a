"""The daemon's socket files: created through checked directory fds, never through a symlink
or a directory another user can write, replaced only when stale and ours, removed only when
still the file it bound (docs/protocol.md §7, §11)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw

ATTACKER = 4242
GROUP = 4300

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as other users")


def _run_ramd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A daemon that must refuse to start: its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "ramd", *args], capture_output=True, text=True, timeout=timeout
    )


def _stale_socket(path: Path) -> os.stat_result:
    """Leave a socket file at ``path`` with nobody listening."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return os.lstat(path)


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned directory other uids can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ramd-paths-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- refusals at start -------------------------------------------------------------------


@needs_root
def test_directory_owned_by_another_user_is_refused(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, ATTACKER, ATTACKER)
    proc = _run_ramd("--socket", str(theirs / "ramd.sock"))
    assert proc.returncode == 1
    (error,) = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert error.endswith(
        f" ERROR ramd: cannot start: refusing directory {theirs}: it is owned by uid"
        f" {ATTACKER}, who could replace what ramd puts there; choose another path: --socket"
        " PATH, --qmp-socket PATH, or RAMD_SOCKET"
    )
    assert list(theirs.iterdir()) == []


@needs_root
def test_parent_owned_by_another_user_is_refused_before_creating_anything(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir()
    os.chown(theirs, ATTACKER, ATTACKER)
    proc = _run_ramd("--socket", str(theirs / "a" / "b" / "ramd.sock"))
    assert proc.returncode == 1
    assert f"refusing directory {theirs}:" in proc.stderr
    assert list(theirs.iterdir()) == []


def test_world_writable_directory_without_sticky_bit_is_refused(base: Path) -> None:
    open_dir = base / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    proc = _run_ramd("--socket", str(open_dir / "ramd.sock"))
    assert proc.returncode == 1
    assert f"refusing directory {open_dir}: other users can write it (mode 0777" in proc.stderr
    group_writable = base / "group"
    group_writable.mkdir()
    os.chmod(group_writable, 0o770)
    proc = _run_ramd("--socket", str(group_writable / "ramd.sock"))
    assert proc.returncode == 1
    assert f"refusing directory {group_writable}: other users can write it" in proc.stderr


def test_symlink_on_the_path_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    link = base / "link"
    link.symlink_to(real)
    proc = _run_ramd("--socket", str(link / "ramd.sock"))
    assert proc.returncode == 1
    assert f"refusing directory {link}: it is a symbolic link" in proc.stderr
    assert list(real.iterdir()) == []


def test_non_socket_at_the_path_is_left_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    os.chmod(target, 0o600)
    file_path = tmp_path / "file.sock"
    file_path.write_bytes(b"not a socket")
    link_path = tmp_path / "link.sock"
    link_path.symlink_to(target)
    stale_target = tmp_path / "stale-target.sock"
    _stale_socket(stale_target)
    link_to_socket = tmp_path / "link-to-socket.sock"
    link_to_socket.symlink_to(stale_target)
    before = {p: os.lstat(p) for p in (target, file_path, link_path, stale_target, link_to_socket)}
    for path in (file_path, link_path, link_to_socket):
        proc = _run_ramd("--socket", str(path))
        assert proc.returncode == 1
        assert f"refusing {path}: it exists and is not a socket; left untouched" in proc.stderr
    for p, st in before.items():
        now = os.lstat(p)
        assert (now.st_ino, now.st_mode, now.st_uid, now.st_mtime_ns) == (
            st.st_ino,
            st.st_mode,
            st.st_uid,
            st.st_mtime_ns,
        )
    assert target.read_bytes() == b"keep me"


@needs_root
def test_another_users_socket_is_left_untouched(base: Path) -> None:
    mine = base / "mine"
    mine.mkdir(mode=0o755)
    theirs = mine / "ramd.sock"
    st = _stale_socket(theirs)
    os.chown(theirs, ATTACKER, ATTACKER, follow_symlinks=False)
    proc = _run_ramd("--socket", str(theirs))
    assert proc.returncode == 1
    assert f"refusing {theirs}: it is a socket of uid {ATTACKER}, not ours" in proc.stderr
    assert os.lstat(theirs).st_ino == st.st_ino


def test_missing_group_is_a_config_error_and_leaves_no_file(tmp_path: Path) -> None:
    cfg = tmp_path / "ramd.toml"
    cfg.write_text('socket-group = "nosuchgroup"\n')
    sock_dir = tmp_path / "run"
    proc = _run_ramd("--config", str(cfg), "--socket", str(sock_dir / "ramd.sock"))
    assert proc.returncode == 2
    assert proc.stderr == f"ramd: {cfg}: socket-group: no such group 'nosuchgroup'\n"
    assert not sock_dir.exists()


def test_socket_name_too_long_for_an_address_is_refused(tmp_path: Path) -> None:
    name = "s" * 100 + ".sock"
    proc = _run_ramd("--socket", str(tmp_path / name))
    assert proc.returncode == 1
    assert "is too long for a Unix socket address" in proc.stderr
    assert not (tmp_path / name).exists()


# -- what works --------------------------------------------------------------------------


def test_missing_directories_are_created_0700(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "ramd" / "ramd.sock"
    d = Daemon(tmp_path, socket_path=sock)
    try:
        for directory in (tmp_path / "run", tmp_path / "run" / "ramd"):
            st = os.stat(directory)
            assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        with Raw(sock) as rpc:
            assert rpc.call("query-version")
    finally:
        assert d.stop() == 0
    assert not sock.exists()


@needs_root
def test_socket_group_makes_new_directories_0750_and_the_socket_its_group(base: Path) -> None:
    sock = base / "run" / "ramd.sock"
    cfg = f'socket-group = {GROUP}\nsocket-mode = "0660"\n'
    d = Daemon(base, cfg, socket_path=sock)
    try:
        st = os.stat(base / "run")
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o750, GROUP)
        st = os.lstat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, GROUP)
    finally:
        assert d.stop() == 0


def test_a_long_directory_path_works_through_the_directory_fd(tmp_path: Path) -> None:
    """``bind`` goes through ``/proc/self/fd/N/name``: only the name counts against the
    108 bytes of a socket address, not the directory's path (the client here reaches it the
    same way)."""
    deep = tmp_path.joinpath(*["d" * 40] * 5)
    sock = deep / "ramd.sock"
    assert len(str(sock)) > 200
    log = open(tmp_path / "ramd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "ramd", "--socket", str(sock)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
        try:
            with Raw(f"/proc/self/fd/{fd}/ramd.sock") as rpc:
                assert rpc.call("query-version")
        finally:
            os.close(fd)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        log.close()
    assert not sock.exists()


def test_socket_directly_in_a_sticky_world_writable_directory(base: Path) -> None:
    sticky = base / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    sock = sticky / "ramd.sock"
    d = Daemon(base, socket_path=sock)
    try:
        with Raw(sock) as rpc:
            assert rpc.call("query-version")
    finally:
        assert d.stop() == 0
    assert not sock.exists()


def test_stale_socket_of_ours_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    sock = tmp_path / "ramd.sock"
    _stale_socket(sock)
    os.chmod(sock, 0o644)
    d = Daemon(tmp_path)
    try:
        # Replaced: the daemon's own file (0600) now answers at the path.
        live = os.lstat(sock)
        assert stat.S_IMODE(live.st_mode) == 0o600
        proc = _run_ramd("--socket", str(sock))
        assert proc.returncode == 1
        assert f"another daemon is already listening on {sock}" in proc.stderr
        assert os.lstat(sock).st_ino == live.st_ino
        with Raw(sock) as rpc:
            assert rpc.call("query-version")
    finally:
        assert d.stop() == 0


def test_shutdown_removes_only_the_file_it_bound(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    moved = tmp_path / "moved.sock"
    os.rename(d.path, moved)
    replacement = _stale_socket(d.path)
    assert d.stop() == 0
    assert os.lstat(d.path).st_ino == replacement.st_ino
    assert moved.exists()


# -- the racer ---------------------------------------------------------------------------


def _swap_in(link_target: Path, tmp: Path, dest: Path) -> None:
    with contextlib.suppress(OSError):
        os.symlink(link_target, tmp)
    with contextlib.suppress(OSError):
        os.rename(tmp, dest)


def _race_forever(attacker_dir: Path, sticky: Path, targets: list[Path], stop_fd: int) -> int:
    """One racer round after another until ``stop_fd`` is readable; the number of rounds."""
    sub, old = attacker_dir / "sub", attacker_dir / "sub.old"
    rounds = 0
    while not select.select([stop_fd], [], [], 0)[0]:
        for target in targets:
            _swap_in(target, attacker_dir / ".tmp", attacker_dir / "ramd.sock")
            _swap_in(target, sticky / ".racer", sticky / "ramd.sock")
            with contextlib.suppress(OSError):
                os.rename(sub, old)
            _swap_in(target.parent, attacker_dir / ".tmpdir", sub)
            with contextlib.suppress(OSError):
                os.unlink(attacker_dir / "ramd.sock")
            with contextlib.suppress(OSError):
                os.unlink(sticky / "ramd.sock")
            for p in (old, sub):
                with contextlib.suppress(OSError):
                    os.unlink(p)
                with contextlib.suppress(OSError):
                    os.rmdir(p)
            with contextlib.suppress(OSError):
                os.mkdir(sub)
        rounds += 1
    return rounds


def _snapshot(paths: list[Path]) -> dict[Path, tuple[int, ...] | None]:
    out: dict[Path, tuple[int, ...] | None] = {}
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[p] = None
            continue
        out[p] = (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size)
    return out


@needs_root
def test_racer_cannot_steer_200_starts(base: Path) -> None:
    attacker_dir = base / "attacker"
    attacker_dir.mkdir()
    os.chown(attacker_dir, ATTACKER, ATTACKER)
    sticky = base / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    bait = base / "bait"
    bait.mkdir(mode=0o755)
    secret = bait / "secret"
    secret.write_bytes(b"root only")
    os.chmod(secret, 0o600)
    stale = bait / "stale.sock"
    _stale_socket(stale)
    os.chmod(stale, 0o600)
    inner = bait / "inner"
    inner.mkdir(mode=0o700)
    _stale_socket(inner / "ramd.sock")
    (inner / "file").write_bytes(b"x")
    baits = [bait, secret, stale, inner, inner / "ramd.sock", inner / "file"]
    before = _snapshot(baits)
    targets = [secret, stale, inner / "ramd.sock"]

    stop_r, stop_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the racer
        rounds = -1
        try:
            os.close(stop_w)
            os.close(res_r)
            os.setgroups([])
            os.setgid(ATTACKER)
            os.setuid(ATTACKER)
            rounds = _race_forever(attacker_dir, sticky, targets, stop_r)
        finally:
            os.write(res_w, str(rounds).encode())
            os._exit(0)
    os.close(stop_r)
    os.close(res_w)
    paths = [attacker_dir / "ramd.sock", attacker_dir / "sub" / "ramd.sock", sticky / "ramd.sock"]
    config = f'socket-mode = "0666"\nsocket-group = {GROUP}\n'
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("start_stop_loop.py")), "200", config]
            + [str(p) for p in paths],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        os.write(stop_w, b"x")
        os.close(stop_w)
        rounds = int(os.read(res_r, 64) or b"-1")
        os.close(res_r)
        os.waitpid(pid, 0)
    assert proc.returncode == 0, proc.stderr
    outcomes = json.loads(proc.stdout)
    assert len(outcomes) == 200
    assert rounds > 0, "the racer never ran"

    for outcome, path, message in outcomes:
        if path.startswith(str(attacker_dir)):
            assert (outcome, message) == (
                "refused",
                f"refusing directory {attacker_dir}: it is owned by uid {ATTACKER}, who could"
                " replace what ramd puts there",
            )
        elif outcome == "refused":
            assert message == f"refusing {path}: it exists and is not a socket; left untouched"
        elif outcome == "oserror":  # the racer took the name between lstat and bind
            assert "Address already in use" in message, message
        else:
            assert outcome == "served", (outcome, message)
    assert _snapshot(baits) == before
    assert secret.read_bytes() == b"root only"
    leftover = sticky / "ramd.sock"
    assert not leftover.exists() or os.lstat(leftover).st_uid == ATTACKER


@needs_root
def test_properly_owned_directory_works_after_the_racer(base: Path) -> None:
    """Without the attacker, the same layout owned by root serves."""
    run = base / "run"
    run.mkdir(mode=0o700)
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("start_stop_loop.py")),
            "20",
            'socket-mode = "0660"\n',
            str(run / "ramd.sock"),
            str(run / "sub" / "ramd.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert {o[0] for o in json.loads(proc.stdout)} == {"served"}
    assert sorted(p.name for p in run.iterdir()) == ["sub"]
    assert list((run / "sub").iterdir()) == []
