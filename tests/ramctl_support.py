"""Helpers for the ``ramctl`` tests: run it as a subprocess, read a running ``watch``."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
RAMCTL = [sys.executable, "-m", "ramd_client.cli"]


def ramctl(
    sock: Path | str | None,
    *args: str,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    **kw: Any,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``ramctl [--socket SOCK] ARGS...`` to completion."""
    cmd = [*RAMCTL, *(["--socket", str(sock)] if sock is not None else []), *args]
    return subprocess.run(
        cmd, input=input, capture_output=True, env=env, timeout=timeout, check=False, **kw
    )


def ok(sock: Path | str, *args: str, input: bytes | None = None) -> str:
    """Run ramctl; it must succeed with nothing on stderr. Its stdout, decoded."""
    p = ramctl(sock, *args, input=input)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stderr == b""
    return p.stdout.decode()


def jok(sock: Path | str, *args: str) -> Any:
    return json.loads(ok(sock, "--json", *args))


def env_without_socket(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAMD_SOCKET", "XDG_RUNTIME_DIR")}
    env.update(extra)
    return env


class Watch:
    """A running ``ramctl watch``, read line by line with a deadline."""

    def __init__(self, sock: Path, *args: str, **popen: Any) -> None:
        """``popen`` overrides the Popen arguments (stdout and stderr are pipes)."""
        self.proc = subprocess.Popen(
            [*RAMCTL, "--socket", str(sock), *args],
            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen},
        )
        self.buf = b""

    def line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no line from watch; got {self.buf!r}"
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                assert chunk, "watch exited: " + self.stop_and_stderr()
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        return raw.decode()

    def no_line(self, wait: float = 0.3) -> bool:
        assert self.proc.stdout is not None
        return b"\n" not in self.buf and not select.select([self.proc.stdout], [], [], wait)[0]

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(20)

    def stop_and_stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
