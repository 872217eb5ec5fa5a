"""``ramctl top`` (a live view: figures, rates, blocks and their holders) and the holders that
``ramctl info`` shows, against a real daemon."""

from __future__ import annotations

import json
import os
import re
import signal
from types import SimpleNamespace

from daemon import Daemon, Raw
from ramctl_support import MiB, Watch, ok, ramctl
from ramd_client.cli_holders import holders_text
from ramd_client.shared import get_fd

HEAD_RE = re.compile(
    r"ramd: 2 blocks, used 3 MiB, reserved 9 MiB, 2 clients, 0 subscribers, up \d+ s\n"
    r"commands/s: \d+\.\d  events/s: \d+\.\d  \(since start\)\n\n"
)


def test_top_once_shows_blocks_sizes_and_holders(any_daemon: Daemon) -> None:
    with Raw(any_daemon.path) as r:
        r.call("ram-block-add", id="a", size=MiB)
        r.call("ram-block-add", id="b", size=2 * MiB, backend="memfd", **{"max-size": 8 * MiB})
    fd, _info, mapper = get_fd(any_daemon.path, "b")
    try:
        out = ok(any_daemon.path, "top", "--once")
    finally:
        os.close(fd)
        mapper.close()
    head = HEAD_RE.match(out)
    assert head is not None, out
    assert out[head.end() :].splitlines() == [
        "ID  BACKEND    SIZE   MAX-SIZE  USE   HOLDERS",
        "a   anonymous  1 MiB  1 MiB     100%  0",
        "b   memfd      2 MiB  8 MiB     25%   1",
    ]


def test_top_frames_as_json_rates_leave_out_its_own_commands(any_daemon: Daemon) -> None:
    with Raw(any_daemon.path) as r:
        r.call("ram-block-add", id="a", size=MiB)
    lines = ok(any_daemon.path, "--json", "top", "-n", "3", "-d", "0.05").splitlines()
    frames = [json.loads(line) for line in lines]
    assert len(frames) == 3
    assert frames[0]["rates"]["over"] == "since start"
    assert frames[0]["rates"]["commands"] > 0 and frames[0]["rates"]["events"] > 0
    for frame in frames[1:]:  # nobody else sent anything meanwhile
        assert frame["rates"]["over"].startswith("last ")
        assert frame["rates"]["commands"] == 0 and frame["rates"]["events"] == 0
        assert frame["blocks"] == [
            {"id": "a", "backend": "anonymous", "size": MiB, "max-size": MiB, "holders": 0}
        ]
        assert frame["stats"]["blocks"] == 1 and frame["stats"]["used"] == MiB
    assert frames[2]["stats"]["commands"] - frames[1]["stats"]["commands"] == 2


def test_top_stops_on_sigint_with_exit_0_even_when_started_with_it_ignored(
    any_daemon: Daemon,
) -> None:
    w = Watch(any_daemon.path, "--json", "top", "-d", "0.05", preexec_fn=_ignore_sigint)
    try:
        assert json.loads(w.line(30))["stats"]["blocks"] == 0  # a frame: it runs
        assert w.interrupt() == 0
        assert w.stop_and_stderr() == ""
    finally:
        w.close()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_top_refuses_a_bad_count() -> None:
    p = ramctl(None, "top", "-n", "0")
    assert p.returncode == 2 and b"1 or more expected" in p.stderr


def test_info_shows_the_holders_the_daemon_reports(any_daemon: Daemon) -> None:
    with Raw(any_daemon.path) as r:
        r.call("ram-block-add", id="b", size=MiB, backend="memfd")
    assert ok(any_daemon.path, "info", "b").splitlines()[-1] == "holders: 0"
    fd, _info, mapper = get_fd(any_daemon.path, "b")
    try:
        lines = ok(any_daemon.path, "info", "b").splitlines()
        assert lines[-3] == "holders: 1 (mapper 1)" and lines[-2].split() == ["KIND", "PID", "UID"]
        assert lines[-1].split() == ["mapper", str(os.getpid()), str(os.getuid())]
    finally:
        os.close(fd)
        mapper.close()


def test_holders_listed_one_by_one_when_the_daemon_lists_them() -> None:
    """A ``RamBlockInfo`` with ``holders`` (docs/protocol.md §12) is shown holder by holder."""
    block = SimpleNamespace(
        mappers=1,
        leases=1,
        holders=[
            {"kind": "mapper", "pid": 1234, "uid": 1000},
            SimpleNamespace(kind="lease", pid=99, uid=0),
        ],
    )
    assert holders_text(block).splitlines() == [
        "holders: 2 (mapper 1, lease 1)",
        "KIND    PID   UID",
        "mapper  1234  1000",
        "lease   99    0",
    ]
    counted = SimpleNamespace(mappers=2, leases=1)
    assert holders_text(counted) == "holders: 3 (mapper 2, lease 1)"
