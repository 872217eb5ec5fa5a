"""Run the real daemon as other uids, and as root in a mount namespace of its own.

- :func:`portable_python`: the test interpreter and its packages may live where other uids
  cannot read them (``/root``, a 0700 ``mktemp -d``), so the daemon of another uid runs on a
  venv made from ``/usr/bin/python3`` (same minor version) in a directory anyone can enter,
  holding copies of ``ramd`` and of the distributions it needs at run time.
- :func:`make_test_user`: a system user made with ``useradd`` when absent (left in place for the
  next run), besides ``nobody``.
- :class:`DefaultsDaemon`: a daemon started with no option but ``--log-level debug`` and an
  environment of the test's choosing, so every directory comes from its defaults; ``wrap``
  (``setpriv``, ``unshare``) runs it as another uid or in another namespace, and ``root``
  (``/proc/PID/root``) reaches its sockets from this namespace.

Needs root (setuid), ``setpriv`` and ``useradd``; :func:`skip_reason` says what is missing.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from packaging.requirements import Requirement

import ramd

SYSTEM_PYTHON = Path("/usr/bin/python3")
#: The user :func:`make_test_user` makes.
TEST_USER = "ramd-test"
NOBODY = 65534


def skip_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("setpriv", "useradd", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not SYSTEM_PYTHON.exists():
        return f"needs {SYSTEM_PYTHON}"
    version = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        return f"{SYSTEM_PYTHON} is {version}, the tests run on {sys.version_info[:2]}"
    return None


def _distributions(name: str) -> set[str]:
    """``name`` and every distribution it needs at run time (no extras), recursively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def portable_python(root: Path, also: tuple[str, ...] = ()) -> Path:
    """A venv in ``root`` (made 0755) that any uid can run ramd from, with the distributions
    ``also`` (optional ones, e.g. ``uvloop``) too; its interpreter."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    venv = root / "venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python3*/site-packages")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(ramd.__file__).parent, site / "ramd", ignore=ignore)
    wanted = set().union(*map(_distributions, ("ramd", *also)))
    for name in wanted - {"ramd"}:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue
            dest = site / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(str(dist.locate_file(file))), dest)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return venv / "bin" / "python3"


def make_test_user() -> int:
    """The uid of :data:`TEST_USER`, made (a system user, no home) when absent."""
    try:
        return pwd.getpwnam(TEST_USER).pw_uid
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", TEST_USER],
        check=True,
    )
    return pwd.getpwnam(TEST_USER).pw_uid


def as_uid(uid: int) -> list[str]:
    """A ``wrap`` that runs the daemon as ``uid`` (its own group, no other group)."""
    gid = pwd.getpwuid(uid).pw_gid
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]


def private_run_dirs() -> list[str]:
    """A ``wrap`` that gives the daemon fresh, empty ``/run`` and ``/var/lib`` (tmpfs, root's,
    0755) in a mount namespace of its own: root's defaults without touching the host's."""
    script = (
        "mount -t tmpfs -o mode=0755 ramd-run /run"
        ' && mount -t tmpfs -o mode=0755 ramd-lib /var/lib && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def user_dirs(base: Path, uid: int) -> dict[str, str]:
    """A login session's environment for ``uid`` under ``base``: its own
    ``XDG_RUNTIME_DIR`` (0700, like ``/run/user/UID``) and ``HOME`` (0700)."""
    env = {}
    for key, name in (("XDG_RUNTIME_DIR", "run"), ("HOME", "home")):
        d = base / f"{name}-{uid}"
        d.mkdir(mode=0o700)
        os.chown(d, uid, pwd.getpwuid(uid).pw_gid)
        env[key] = str(d)
    return env


class DefaultsDaemon:
    """``python -m ramd --log-level debug``: every path from the defaults and ``env`` (which
    replaces the environment but ``PATH``). ``socket`` is where its JSON-RPC socket is seen
    from this process (under ``/proc/PID/root`` for a daemon in another mount namespace)."""

    def __init__(
        self,
        python: Path,
        cwd: Path,
        log: Path,
        env: Mapping[str, str],
        socket_path: str,
        wrap: Sequence[str] = (),
        private_root: bool = False,
    ) -> None:
        self.log = log
        self._logf = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*wrap, str(python), "-m", "ramd", "--log-level", "debug"],
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            stdout=self._logf,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self.root = Path(f"/proc/{self.pid}/root") if private_root else Path("/")
        self.socket = self.seen(socket_path)

    def seen(self, path: str) -> Path:
        """``path`` as the daemon names it, reached from this process."""
        return self.root / path.lstrip("/")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the socket accepts; RuntimeError with the log if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready: {self.log_text()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.02)

    def wait_exit(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._logf.close()
        return code

    def stop(self) -> int:
        """SIGTERM (unless it exited); its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.wait_exit()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait_exit()
