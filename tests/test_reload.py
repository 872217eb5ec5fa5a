"""SIGHUP reloads the configuration without ever hanging or bloating the daemon, and keeps the
running configuration on any error (issue 21, point 9). Real daemon, real signals, a real
FIFO and device."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon import Daemon, Raw

PAGE = 4096


def _hup_and_wait(d: Daemon, expected: str) -> str:
    """Send SIGHUP; the log lines written until ``expected`` appears."""
    d.mark_log()
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while expected not in (text := d.log_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.02)
    return text


def _readonly_for_root(d: Daemon) -> bool:
    with Raw(d.path) as rpc:
        answer = rpc.request("ram-block-del", id="a")
    message: str = answer.get("error", {}).get("message", "")
    return message.startswith("Permission denied: read-only peer")


@pytest.mark.parametrize(
    "replace",
    [
        pytest.param(lambda p: os.mkfifo(p), id="fifo"),
        pytest.param(lambda p: p.symlink_to("/dev/zero"), id="dev-zero"),
        pytest.param(lambda p: p.write_text(""), id="empty"),
        pytest.param(lambda p: p.write_text("  \n"), id="blank"),
        pytest.param(lambda p: p.write_bytes(b"# " + b"x" * (2 << 20) + b"\n"), id="huge"),
        pytest.param(lambda p: p.write_bytes(b'log-level = "\xff"\n'), id="not-utf8"),
    ],
)
def test_a_bad_config_file_on_sighup_keeps_the_running_one(
    start_daemon: Callable[..., Daemon], tmp_path: Path, replace: Callable[[Path], None]
) -> None:
    """Before, a FIFO hung the daemon for good (its loop thread waited in open), /dev/zero
    grew it by GiBs, and an empty file silently dropped readonly-uids."""
    d = start_daemon("readonly-uids = [0]\n")
    with Raw(d.path) as rpc:
        assert rpc.call("query-version")
    config = tmp_path / "ramd.toml"
    config.unlink()
    replace(config)
    text = _hup_and_wait(d, "configuration not reloaded")
    assert "the running one is kept" in text
    assert _readonly_for_root(d)  # still read-only: readonly-uids kept, daemon answering
    assert d.rss() < 512 << 20
    config.unlink()
    config.write_text('log-level = "info"\n')
    _hup_and_wait(d, "configuration reloaded")
    assert not _readonly_for_root(d)
    assert d.stop() == 0
