"""Run the real daemon as a subprocess on a Unix socket in a temp dir, and talk to it raw."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


class Daemon:
    """A ``python -m ramd`` subprocess. ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(
        self,
        tmp: Path,
        config: str = "",
        *args: str,
        qmp: bool = False,
        wrap: Sequence[str] = (),
        socket_path: Path | None = None,
        pass_fds: Sequence[int] = (),
        python: str = sys.executable,
        env: dict[str, str] | None = None,
    ) -> None:
        """``wrap``: a command that execs the daemon's command line given after it (setpriv,
        prlimit, ...); the daemon keeps its pid. ``socket_path``: where the JSON-RPC socket
        goes, instead of ``tmp/ramd.sock`` (the log and config stay in ``tmp``). ``pass_fds``:
        fds the daemon (or ``wrap``) inherits. ``python`` runs ``-m ramd``; ``env`` adds to
        the environment."""
        self.dir = tmp
        self.path = socket_path or tmp / "ramd.sock"
        self.qmp_path: Path | None = tmp / "qmp.sock" if qmp else None
        self.log = tmp / "ramd.log"
        self._log_from = 0
        cmd = [python, "-m", "ramd", "--socket", str(self.path), "--log-level", "debug"]
        if self.qmp_path is not None:
            cmd += ["--qmp-socket", str(self.qmp_path)]
        if config:
            cfg = tmp / "ramd.toml"
            cfg.write_text(config)
            cmd += ["--config", str(cfg)]
        cmd += list(args)
        self._logf = open(self.log, "wb")  # noqa: SIM115
        # Images go to the test's directory unless its config names a state-dir.
        env = {**os.environ, "STATE_DIRECTORY": str(tmp / "state"), **(env or {})}
        self.proc = subprocess.Popen(
            [*wrap, *cmd],
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        """Until every socket of the daemon accepts connections."""
        deadline = time.monotonic() + timeout
        for path in (self.path, self.qmp_path):
            while path is not None:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daemon not ready: {self.log_text()}")
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(path))
                    break
                except OSError:
                    time.sleep(0.02)

    def log_text(self) -> str:
        """The log since the last :meth:`mark_log` (all of it when never marked)."""
        with open(self.log, "rb") as f:
            f.seek(self._log_from)
            return f.read().decode(errors="replace")

    def mark_log(self) -> None:
        """Start :meth:`log_text` at the log's current end: a test on a daemon that earlier
        tests used sees only the lines written during it."""
        self._log_from = self.log.stat().st_size

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


class Raw:
    """A blocking JSON-RPC connection that keeps events apart from responses."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any] | list[Any]:
        """The next message (one line) from the daemon."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        return json.loads(raw)  # type: ignore[no-any-return]

    def reply(self) -> Any:
        """The next non-event message; events seen meanwhile go to ``self.events``."""
        while True:
            msg = self.line()
            if isinstance(msg, dict) and "id" not in msg and "method" in msg:
                self.events.append(msg)
                continue
            return msg

    def request(self, method: str, params: Any = None, **kw: Any) -> dict[str, Any]:
        """Send one request, return its whole response object."""
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": self.next_id}
        self.next_id += 1
        if params is not None or kw:
            req["params"] = {**(params or {}), **kw}
        self.send(json.dumps(req).encode())
        resp = self.reply()
        assert resp["id"] == req["id"], resp
        return resp  # type: ignore[no-any-return]

    def call(self, method: str, params: Any = None, **kw: Any) -> Any:
        """The ``result`` of a request that must succeed."""
        resp = self.request(method, params, **kw)
        assert "result" in resp, resp
        return resp["result"]

    def error(self, method: str, params: Any = None, **kw: Any) -> dict[str, Any]:
        """The ``error`` of a request that must fail."""
        resp = self.request(method, params, **kw)
        assert "error" in resp, resp
        return resp["error"]  # type: ignore[no-any-return]


def reset(d: Daemon, memory_dir: Path | None = None, timeout: float = 20.0) -> None:
    """Bring a used daemon back to a fresh one's state: wait until the connections of
    earlier tests are gone (so no mapper holds a block), delete every block left, then check
    that nothing is left (no block, nothing reserved, used or resident, no subscriber, no
    job, no file in ``memory_dir``). AssertionError (with the log) if the daemon died or cannot be
    brought back."""
    assert d.alive(), f"the daemon died: {d.log_text()}"
    deadline = time.monotonic() + timeout
    with Raw(d.path, timeout=timeout) as r:
        while (clients := r.call("query-stats")["clients"]) > 1:
            assert time.monotonic() < deadline, f"{clients - 1} connections left"
            time.sleep(0.01)
        for block in r.call("query-ram-blocks"):
            r.call("ram-block-del", id=block["id"])
        stats = r.call("query-stats")
        left = {k: stats[k] for k in ("blocks", "reserved", "used", "resident", "subscribers")}
        assert left == dict.fromkeys(left, 0), left
        assert r.call("query-jobs") == [], "jobs left"
    # Until the daemon has forgotten this connection too (it logs each one it accepts and,
    # once forgotten, closes at debug level), so that a test sees no client but its own.
    while (log := d.log.read_text(errors="replace")).count(" closed connection ") < log.count(
        " accepted connection "
    ):
        assert time.monotonic() < deadline, "the daemon did not close the connections"
        time.sleep(0.005)
    if memory_dir is not None and memory_dir.exists():  # the daemon makes it on first use
        left_files = {p.name for p in memory_dir.iterdir()} - {".lock"}  # the daemon's own
        assert not left_files, left_files


class DaemonPool:
    """Daemons kept for the whole session, started on first use: one per event loop, with
    the embedded defaults and a QMP socket, and one per loop with a ``memory-dir`` of its own
    on tmpfs. Owned by the session; used by one test at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: dict[tuple[str, bool], tuple[Daemon, Path | None]] = {}

    def _get(self, loop: str, memory_dir: bool) -> tuple[Daemon, Path | None]:
        key = (loop, memory_dir)
        if key not in self.daemons:
            tmp = self.root / f"{loop}{'-mem' if memory_dir else ''}"
            tmp.mkdir()
            mem: Path | None = None
            config = ""
            if memory_dir:
                mem = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm")) / "mem"
                config = f'memory-dir = "{mem}"\n'
            self.daemons[key] = (Daemon(tmp, config, "--event-loop", loop, qmp=True), mem)
        return self.daemons[key]

    @contextlib.contextmanager
    def use(self, loop: str, memory_dir: bool = False) -> Iterator[Daemon]:
        """The pooled daemon, reset (see :func:`reset`) before and after the test, which sees
        only its own log lines."""
        d, mem = self._get(loop, memory_dir)
        reset(d, mem)
        d.mark_log()
        yield d
        reset(d, mem)

    def close(self) -> None:
        for d, mem in self.daemons.values():
            d.stop()
            if mem is not None:
                shutil.rmtree(mem.parent)


def wait_job(raw: Raw, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll ``query-jobs`` until the job concluded; its last info."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = next(j for j in raw.call("query-jobs") if j["id"] == job_id)
        if job["status"] == "concluded":
            return job  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not conclude")
