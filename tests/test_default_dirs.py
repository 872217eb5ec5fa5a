"""Per-user defaults of ``memory-dir`` and ``state-dir`` (issue 24): two users and root run
daemons with their defaults at once; root's defaults cannot be squatted; a bad ``memory-dir``
refuses ``file`` blocks instead of the start, a bad ``state-dir`` is reported at start, and
start-up errors say what to do. Real daemons as real uids (:mod:`otheruser`)."""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw, wait_job
from otheruser import (
    NOBODY,
    DefaultsDaemon,
    as_uid,
    make_test_user,
    portable_python,
    private_run_dirs,
    skip_reason,
    user_dirs,
)

MiB = 1 << 20
#: Small: on Debian 12's Python 3.11.2 the daemon never answers requests with strings of more
#: than about 256 bytes (its splitter's possessive patterns; 3.11.7 is fine).
PAYLOAD = b"ramd per-user defaults\n" * 4

SKIP = skip_reason()
needs_users = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


@pytest.fixture(scope="module")
def python() -> Iterator[Path]:
    """An interpreter with ramd that every uid can run (see :func:`otheruser.portable_python`)."""
    root = Path(tempfile.mkdtemp(prefix="ramd-python-"))
    try:
        yield portable_python(root)
    finally:
        shutil.rmtree(root)


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory every uid can enter (pytest's ``tmp_path`` is 0700): working directory,
    logs, and the users' runtime and home directories."""
    d = Path(tempfile.mkdtemp(prefix="ramd-users-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _use_file_block_and_save(d: DefaultsDaemon) -> dict[str, object]:
    """Add a ``file`` block with defaults, write to it, save an image with defaults; the
    block's info."""
    with Raw(d.socket) as r:
        info = r.call("ram-block-add", id="blk", size=MiB, backend="file")
        r.call("ram-block-write", id="blk", offset=0, data=base64.b64encode(PAYLOAD).decode())
        job = wait_job(r, r.call("ram-save", target={"file": "img"})["job-id"])
        assert "error" not in job, (job, d.log_text())
    return info  # type: ignore[no-any-return]


def _owned(path: Path, uid: int, mode: int) -> bool:
    st = path.stat()
    return st.st_uid == uid and stat.S_IMODE(st.st_mode) == mode


@needs_users
def test_two_users_and_root_run_daemons_with_defaults_at_once(python: Path, base: Path) -> None:
    users = [NOBODY, make_test_user()]
    daemons: list[tuple[int, dict[str, str], DefaultsDaemon]] = []
    try:
        for uid in users:
            env = user_dirs(base, uid)
            sock = f"{env['XDG_RUNTIME_DIR']}/ramd/ramd.sock"
            d = DefaultsDaemon(python, base, base / f"{uid}.log", env, sock, wrap=as_uid(uid))
            daemons.append((uid, env, d))
        root = DefaultsDaemon(
            python,
            base,
            base / "root.log",
            {},
            "/run/ramd/ramd.sock",
            wrap=private_run_dirs(),
            private_root=True,
        )
        daemons.append((0, {}, root))
        for _, _, d in daemons:  # all three started before any is waited for
            d.wait_ready()
        for uid, env, d in daemons:
            runtime = env.get("XDG_RUNTIME_DIR", "/run")
            memory_dir = f"{runtime}/ramd/memory"
            state_dir = f"{env['HOME']}/.local/state/ramd" if uid else "/var/lib/ramd"
            info = _use_file_block_and_save(d)
            assert info["path"] == f"{memory_dir}/blk"
            assert d.seen(f"{memory_dir}/blk").read_bytes()[: len(PAYLOAD)] == PAYLOAD
            assert _owned(d.seen(memory_dir), uid, 0o700)
            assert _owned(d.seen(f"{state_dir}/img"), uid, 0o600)
            log = d.log_text()
            assert f"directories: memory-dir {memory_dir}, state-dir {state_dir}" in log
            assert " WARNING " not in log and " ERROR " not in log, log
        for _, _, d in daemons:
            assert d.stop() == 0, d.log_text()
        # file blocks outlive their daemon: each user's is still there, untouched by the others
        for uid, env, _ in daemons[:2]:
            assert Path(env["XDG_RUNTIME_DIR"], "ramd/memory/blk").stat().st_uid == uid
    finally:
        for _, _, d in daemons:
            d.stop()


@needs_users
def test_another_user_cannot_squat_roots_defaults(python: Path, base: Path) -> None:
    """Before root's daemon starts, ``nobody`` takes the old default ``/dev/shm/ramd`` (with an
    entry in it) and tries to make ``/run/ramd/memory``: the first changes nothing for root,
    the second is impossible; root's daemon starts and serves ``file`` blocks."""
    squat = (
        "mount -t tmpfs -o mode=1777 ramd-shm /dev/shm"
        f" && setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups sh -c '"
        "mkdir /dev/shm/ramd && touch /dev/shm/ramd/ram0 && echo SQUATTED-SHM;"
        " mkdir -p /run/ramd/memory || echo SQUAT-REFUSED'"
        ' && exec "$@"'
    )
    wrap = [*private_run_dirs(), "sh", "-c", squat, "sh"]
    d = DefaultsDaemon(
        python, base, base / "root.log", {}, "/run/ramd/ramd.sock", wrap=wrap, private_root=True
    )
    try:
        d.wait_ready()
        log = d.log_text()
        assert "SQUATTED-SHM" in log and "SQUAT-REFUSED" in log, log
        info = _use_file_block_and_save(d)
        assert info["path"] == "/run/ramd/memory/blk"
        assert _owned(d.seen("/run/ramd/memory"), 0, 0o700)
        assert d.seen("/dev/shm/ramd").stat().st_uid == NOBODY
        assert " WARNING " not in d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_bad_memory_dir_refuses_file_blocks_not_the_start(tmp_path: Path) -> None:
    """A configured ``memory-dir`` another user took first, holding an entry (the attack that
    made the daemon exit 1): the daemon starts and says so; ``file`` blocks are refused with
    the path and the key; once the directory is fixed they work, without a restart."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    mem = parent / "mem"
    mem.mkdir(mode=0o700)
    (mem / "ram0").write_bytes(b"theirs")
    os.chown(mem, NOBODY, NOBODY)
    d = Daemon(tmp_path, f'memory-dir = "{mem}"\n')
    try:
        reason = f"refusing directory {mem}: it is owned by uid {NOBODY}"
        assert (
            f"WARNING ramd: memory-dir {mem} cannot be used: {reason}, who could replace what"
            " ramd puts there; file blocks are refused until it is fixed or memory-dir is"
            " changed (--config FILE)"
        ) in d.log_text()
        with Raw(d.path) as r:
            error = r.error("ram-block-add", id="f", size=MiB, backend="file")
            assert error["message"].startswith(f"Cannot use memory-dir '{mem}': {reason}")
            assert "memory-dir is changed" in error["message"]
            r.call("ram-block-add", id="a", size=MiB)
            r.call("ram-block-add", id="m", size=MiB, backend="memfd")
            assert (mem / "ram0").read_bytes() == b"theirs"
            os.chown(mem, 0, 0)
            assert r.call("ram-block-add", id="f", size=MiB, backend="file")["path"] == str(
                mem / "f"
            )
            r.call("ram-block-del", id="f")
        assert sorted(p.name for p in mem.iterdir()) == [".lock", "ram0"]
    finally:
        assert d.stop() == 0, d.log_text()
        shutil.rmtree(parent)


@needs_users
def test_user_daemon_without_runtime_dir_says_what_to_do(python: Path, base: Path) -> None:
    """No ``XDG_RUNTIME_DIR``: the socket's default ``/run/ramd`` is root's; the daemon exits 1
    naming the directory, and the ways out."""
    d = DefaultsDaemon(
        python,
        base,
        base / "nobody.log",
        {"HOME": str(base)},
        "/run/ramd/ramd.sock",
        wrap=[*private_run_dirs(), *as_uid(NOBODY)],
        private_root=True,
    )
    assert d.wait_exit() == 1
    (error,) = [line for line in d.log_text().splitlines() if " ERROR " in line]
    assert error.endswith(
        "ERROR ramd: cannot start: cannot create directory /run/ramd: Permission denied;"
        " XDG_RUNTIME_DIR is not set, so the socket goes to /run/ramd, which only root (or"
        " ramd.service) can create: set XDG_RUNTIME_DIR or RAMD_SOCKET, or give --socket PATH"
    ), error


@needs_users
def test_user_daemon_reports_unusable_directories_at_start(python: Path, base: Path) -> None:
    """A user without a home or a runtime directory but with a socket: the daemon serves, and
    says at start, before any save, that neither ``memory-dir`` nor ``state-dir`` can be made;
    a ``file`` block and a save fail naming them, anonymous blocks work."""
    sock = base / "nobody.sock"
    os.chmod(base, 0o777 | stat.S_ISVTX)
    d = DefaultsDaemon(
        python,
        base,
        base / "nobody.log",
        {"HOME": "/nonexistent", "RAMD_SOCKET": str(sock)},
        str(sock),
        wrap=[*private_run_dirs(), *as_uid(NOBODY)],
        private_root=True,
    )
    try:
        d.wait_ready()
        with Raw(d.socket) as r:  # answered: the start-up lines are all written
            assert r.call("query-stats")["blocks"] == 0
        log = d.log_text()
        assert (
            "WARNING ramd: memory-dir /run/ramd/memory cannot be used: cannot create directory"
            " /run/ramd: no write permission on /run; file blocks are refused until it is fixed:"
            " set XDG_RUNTIME_DIR"
        ) in log, log
        assert (
            "WARNING ramd: state-dir /nonexistent/.local/state/ramd cannot be used: cannot"
            " create directory /nonexistent: no write permission on /; ram-save and ram-load of"
            " files fail until it is fixed: set state-dir (--config FILE), or STATE_DIRECTORY or"
            " XDG_STATE_HOME"
        ) in log, log
        with Raw(d.socket) as r:
            r.call("ram-block-add", id="a", size=MiB)
            error = r.error("ram-block-add", id="f", size=MiB, backend="file")["message"]
            assert error.startswith("Cannot use memory-dir '/run/ramd/memory': cannot create")
            assert "set XDG_RUNTIME_DIR" in error
            error = r.error("ram-save", target={"file": "img"})["message"]
            assert error == (
                "Cannot open state directory /nonexistent/.local/state/ramd: Permission denied"
            )
    finally:
        assert d.stop() == 0, d.log_text()


@needs_users
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HOME": "/home/u"}, "/home/u/.local/state/ramd"),
        ({"HOME": "/home/u", "XDG_STATE_HOME": "/xdg"}, "/xdg/ramd"),
        # a relative XDG_STATE_HOME is ignored, as the XDG specification says
        ({"HOME": "/home/u", "XDG_STATE_HOME": "rel"}, "/home/u/.local/state/ramd"),
        ({"HOME": "/home/u", "STATE_DIRECTORY": "/var/lib/x:/other"}, "/var/lib/x"),
        ({}, pwd.getpwuid(NOBODY).pw_dir + "/.local/state/ramd"),
    ],
)
def test_state_dir_default_of_a_user(
    python: Path, base: Path, env: dict[str, str], expected: str
) -> None:
    code = "from ramd import config; c = config.Config(); print(c.state_dir, c.memory_dir)"
    out = subprocess.run(
        [*as_uid(NOBODY), str(python), "-c", code],
        cwd=base,
        env={"XDG_RUNTIME_DIR": "/run/user/65534", **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [expected, "/run/user/65534/ramd/memory"]


def test_start_up_log_shows_directories_and_limits_in_human_units(tmp_path: Path) -> None:
    mem = tmp_path / "mem"
    d = Daemon(
        tmp_path, f'memory-dir = "{mem}"\n[limits]\nmax-reserved = "1G"\nmax-used = "1536M"\n'
    )
    try:
        deadline = time.monotonic() + 30
        while " limits: " not in (log := d.log_text()):  # logged just after the socket listens
            assert time.monotonic() < deadline, log
            time.sleep(0.02)
        assert f"directories: memory-dir {mem}, state-dir {tmp_path / 'state'}\n" in log
        assert "limits: max-reserved 1 GiB, max-used 1.5 GiB (host memory " in log
        assert " WARNING " not in log
        assert not mem.exists()  # made at the first file block, not at start
    finally:
        assert d.stop() == 0


def test_start_up_errors_that_stop_the_daemon_say_what_to_do(tmp_path: Path) -> None:
    """The two refusals that still stop a start (exit 1): a socket another daemon serves, a
    ``memory-dir`` another daemon holds; each names the path and the way out."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    mem = parent / "mem"
    config = f'memory-dir = "{mem}"\n[[block]]\nid = "f"\nsize = 4096\nbackend = "file"\n'
    d = Daemon(tmp_path, config)
    try:
        cfg = tmp_path / "2.toml"
        cfg.write_text(f'memory-dir = "{mem}"\n')
        runs = {
            "socket": ["--socket", str(d.path)],
            "memory-dir": ["--socket", str(tmp_path / "2.sock"), "--config", str(cfg)],
        }
        errors = {}
        for what, args in runs.items():
            proc = subprocess.run(
                [sys.executable, "-m", "ramd", *args], capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 1, proc.stderr
            (errors[what],) = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert errors["socket"].endswith(
            f"ERROR ramd: cannot start: another daemon is already listening on {d.path}: stop"
            " that daemon first, or give this one another socket (--socket PATH)"
        )
        assert errors["memory-dir"].endswith(
            f"ERROR ramd: cannot start: memory-dir '{mem}' is in use by another ramd (pid"
            f" {d.pid}): stop that daemon, or give this one another memory-dir (--config FILE)"
        )
        assert d.alive()
    finally:
        assert d.stop() == 0
        shutil.rmtree(parent)
