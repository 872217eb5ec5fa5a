"""Metrics (docs/protocol.md §15): ``GET /metrics`` on ``metrics-listen``, scraped from a real
daemon over a Unix socket and TCP loopback and parsed with ``prometheus_client``'s own parser;
the configuration's refusals; a stalled scraper delays nothing."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw, wait_job
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ramd_client.shared import get_fd

from ramd.config import Limits, parse_config
from ramd.metrics.http import MAX_SCRAPES
from ramd.transport.sockets.admission import Admission, refusal_reason
from ramd.transport.sockets.peer import PeerCredentials

MiB = 1024 * 1024

#: Where the daemon logs the TCP address it serves metrics on.
SERVING_RE = re.compile(r"metrics: serving GET /metrics on (\S+)")


def http_get(target: str, path: str = "/metrics", timeout: float = 10.0) -> tuple[int, str]:
    """``GET path`` on ``target`` (``unix:PATH`` or ``HOST:PORT``): status and body (the
    body of a 200 must be the Prometheus text format, by its content type)."""
    if target.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX)
        address: str | tuple[str, int] = target.removeprefix("unix:")
    else:
        host, _, port = target.rpartition(":")
        sock = socket.socket(socket.AF_INET)
        address = (host, int(port))
    with sock:
        sock.settimeout(timeout)
        sock.connect(address)
        # A server that answers 503 at once may have closed before the request is sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: ramd\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        assert b"\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n" in head, head
    return status, body.decode()


def scrape(target: str) -> dict[str, list[Sample]]:
    """The samples of each metric family, by family name (parsed by prometheus_client)."""
    status, body = http_get(target)
    assert status == 200, body
    return {f.name: list(f.samples) for f in text_string_to_metric_families(body)}


def value(families: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample ``name`` (a sample name) with exactly ``labels``."""
    family = re.sub(r"_(total|bucket|count|sum)$", "", name)
    found = [s.value for s in families[family] if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, families[family])
    return found[0]


def served_at(d: Daemon, timeout: float = 15.0) -> str:
    """Where the daemon logged it serves metrics (``unix:PATH`` or ``HOST:PORT``, a port 0
    resolved), once it has: its JSON-RPC socket accepts connections a moment before."""
    deadline = time.monotonic() + timeout
    while (match := SERVING_RE.search(d.log_text())) is None:
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.02)
    return match.group(1)


def ids_in(families: dict[str, list[Sample]]) -> set[str]:
    return {s.labels["id"] for samples in families.values() for s in samples if "id" in s.labels}


@pytest.fixture(params=["unix", "tcp"])
def metrics_daemon(
    request: pytest.FixtureRequest, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> Iterator[tuple[Daemon, str]]:
    """A daemon serving metrics on a Unix socket or on TCP loopback (a free port), and the
    target to scrape."""
    if request.param == "unix":
        d = start_daemon(f'metrics-listen = "unix:{tmp_path / "metrics.sock"}"\n', qmp=True)
    else:
        d = start_daemon('metrics-listen = "127.0.0.1:0"\n', qmp=True)
    yield d, served_at(d)


def test_scrape_follows_add_resize_and_delete(metrics_daemon: tuple[Daemon, str]) -> None:
    d, target = metrics_daemon
    assert d.qmp_path is not None
    with Raw(d.path) as r, Raw(d.qmp_path) as qmp:
        assert "QMP" in qmp.line()  # a QMP connection, greeted (not negotiated)
        r.call("ram-block-add", id="a", size=MiB)
        r.call("ram-block-add", id="b", size=2 * MiB, backend="memfd", **{"max-size": 8 * MiB})
        assert r.call("subscribe")["seq"] == 2  # its replay makes it a pending command
        fd, _info, mapper = get_fd(d.path, "b")
        try:
            before = scrape(target)
            assert ids_in(before) == {"a", "b"}
            assert value(before, "ramd_blocks") == 2
            assert value(before, "ramd_block_holders", id="a", kind="mapper") == 0
            assert value(before, "ramd_block_holders", id="b", kind="mapper") == 1
            r.call("ram-block-resize", id="b", size=4 * MiB)
            r.call("ram-block-del", id="a")
            assert r.error("ram-block-del", id="a")["data"]["class"] == "DeviceNotFound"
            assert r.error("ram-block-add", id="c", size=-1)["code"] == -32602
            assert r.error("no-such-command")["code"] == -32601
            stats = r.call("query-stats")
            m = scrape(target)
        finally:
            os.close(fd)
            mapper.close()
    assert ids_in(m) == {"b"}  # every series of the deleted block is gone
    assert value(m, "ramd_blocks") == 1 == stats["blocks"]
    assert value(m, "ramd_used_bytes") == 4 * MiB == stats["used"]
    assert value(m, "ramd_reserved_bytes") == stats["reserved"]
    assert value(m, "ramd_block_size_bytes", id="b") == 4 * MiB
    assert value(m, "ramd_block_max_size_bytes", id="b") == 8 * MiB
    assert value(m, "ramd_block_holders", id="b", kind="mapper") == 1
    assert value(m, "ramd_connections", socket="jsonrpc") == 2  # Raw and the mapper
    assert value(m, "ramd_connections", socket="qmp") == 1
    calls = {
        (s.labels["command"], s.labels["outcome"]): s.value
        for s in m["ramd_commands"]
        if s.name == "ramd_commands_total"
    }
    assert calls[("ram-block-add", "ok")] == 2
    assert calls[("ram-block-add", "invalid")] == 1
    assert calls[("ram-block-resize", "ok")] == 1
    assert calls[("ram-block-del", "ok")] == 1
    assert calls[("ram-block-del", "refused")] == 1
    assert calls[("ram-block-get-fd", "ok")] == 1
    assert calls[("(unknown)", "invalid")] == 1
    assert calls[("query-stats", "ok")] == 1
    assert calls[("subscribe", "ok")] == 1
    assert value(m, "ramd_command_seconds_count", command="subscribe") == 1
    assert stats["commands"] == sum(calls.values()) - 1  # all but that query-stats itself
    assert value(m, "ramd_command_seconds_count", command="ram-block-add") == 3
    assert value(m, "ramd_command_seconds_bucket", command="ram-block-add", le="+Inf") == 3
    assert value(m, "ramd_command_seconds_sum", command="ram-block-add") > 0
    assert value(m, "ramd_events_total", event="RAM_BLOCK_ADDED") == 2
    assert value(m, "ramd_events_total", event="RAM_BLOCK_RESIZED") == 1
    assert value(m, "ramd_events_total", event="RAM_BLOCK_REMOVED") == 1
    assert stats["events-emitted"] == 4
    # Families without samples yet are still there, with their types.
    assert m["ramd_pool_ready"] == []
    assert m["ramd_job_bytes"] == []
    assert m["ramd_refused_connections"] == []
    assert http_get(target, "/other")[0] == 404


def test_unix_metrics_socket_has_socket_mode_and_is_removed(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "m" / "metrics.sock"
    d = start_daemon(f'metrics-listen = "unix:{path}"\nsocket-mode = "0660"\n')
    assert served_at(d) == f"unix:{path}"
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert value(scrape(f"unix:{path}"), "ramd_blocks") == 0
    assert d.stop() == 0
    assert not path.exists()


def test_job_bytes_and_refused_connections_are_counted(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon('metrics-listen = "127.0.0.1:0"\n')
    target = served_at(d)
    with Raw(d.path) as r:
        r.call("ram-block-add", id="a", size=3 * MiB)
        r.call("ram-block-write", id="a", offset=0, data="eA==")
        job = r.call("ram-save", target={"file": "img"})["job-id"]
        done = wait_job(r, job)
    assert done.get("error") is None, done
    m = scrape(target)
    assert value(m, "ramd_job_bytes_total", type="ram-save") == done["current-progress"] > 0
    assert value(m, "ramd_events_total", event="JOB_STATUS_CHANGE") >= 3


def test_refused_connections_by_reason(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon('metrics-listen = "127.0.0.1:0"\nallow-uids = [4242]\n')
    target = served_at(d)
    counts = []
    for _ in range(2):
        with Raw(d.path) as r:  # refused: its answer is read, so the refusal was counted
            assert r.reply()["error"]["message"].startswith("Permission denied")
        m = scrape(target)
        counts.append(value(m, "ramd_refused_connections_total", reason="not-allowed"))
        assert value(m, "ramd_connections", socket="jsonrpc") == 0
    assert counts[1] == counts[0] + 1


@pytest.mark.parametrize(
    ("config", "key", "why"),
    [
        ('metrics-listen = "192.0.2.1:9100"', "metrics-listen", "is not a loopback address"),
        ('metrics-listen = "[2001:db8::1]:91"', "metrics-listen", "is not a loopback address"),
        ('metrics-listen = "example.com:9100"', "metrics-listen", "is not a loopback address"),
        ('metrics-listen = "127.0.0.1:99999"', "metrics-listen", "port must be a number"),
        ('metrics-listen = "127.0.0.1"', "metrics-listen", "HOST:PORT"),
        ('metrics-listen = "unix:"', "metrics-listen", "socket path"),
        ('metrics-remote = true\nmetrics-listen = "::1:91"', "metrics-listen", "in brackets"),
        ('metrics-remote = "yes"\nmetrics-listen = "[::1]:0"', "metrics-remote", "boolean"),
    ],
)
def test_bad_metrics_listen_exits_2_naming_the_key(
    tmp_path: Path, config: str, key: str, why: str
) -> None:
    cfg = tmp_path / "ramd.toml"
    cfg.write_text(config + "\n")
    p = subprocess.run(
        [sys.executable, "-m", "ramd", "--socket", str(tmp_path / "s"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert f"{cfg}: {key}: " in p.stderr and why in p.stderr, p.stderr
    assert not (tmp_path / "s").exists()


def test_metrics_remote_allows_any_address(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon('metrics-remote = true\nmetrics-listen = "0.0.0.0:0"\n')
    host, _, port = served_at(d).rpartition(":")
    assert host == "0.0.0.0"
    assert value(scrape(f"127.0.0.1:{port}"), "ramd_blocks") == 0


def test_stalled_scrapers_delay_nothing(metrics_daemon: tuple[Daemon, str]) -> None:
    """Scrapers that connect and send nothing hold handler threads only: the JSON-RPC socket
    answers meanwhile, a scrape still succeeds while slots are left, and one beyond
    ``MAX_SCRAPES`` is answered 503 at once instead of waiting."""
    d, target = metrics_daemon
    stalled: list[socket.socket] = []

    def connect(sent: bytes = b"GET /metr") -> socket.socket:
        if target.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(target.removeprefix("unix:"))
        else:
            host, _, port = target.rpartition(":")
            s = socket.create_connection((host, int(port)))
        s.sendall(sent)
        return s

    try:
        stalled.append(connect(b""))  # sends nothing
        with Raw(d.path, timeout=10.0) as r:
            assert r.call("query-version")["package"].startswith("ramd ")
            assert value(scrape(target), "ramd_blocks") == 0
            stalled += [connect() for _ in range(MAX_SCRAPES - 1)]  # an unfinished line
            assert r.call("query-version")["package"].startswith("ramd ")
            status = 0
            for _ in range(100):  # until the server has handed every stalled one a thread
                status, _body = http_get(target)
                if status == 503:
                    break
            assert status == 503
            assert r.call("ram-block-add", id="x", size=MiB)["size"] == MiB
    finally:
        for s in stalled:
            s.close()
    for _ in range(100):  # their threads end once the sockets are closed
        status, body = http_get(target)
        if status == 200:
            break
    assert status == 200 and "ramd_blocks 1.0" in body


def test_every_admission_refusal_has_its_short_reason() -> None:
    """The texts :class:`Admission` refuses with map to fixed reasons (never a uid)."""
    config = parse_config({"allow-gids": [4242], "limits": {"max-connections": 16}})
    admission = Admission(config, Limits.model_validate({"max-connections": 16}))
    peer = PeerCredentials(pid=1, uid=1000, gid=1000, groups=frozenset({4242}))
    for n in range(16 - admission.reserve):  # every slot non-root peers may take
        assert admission.admit(("conn", n), peer)[1] is None
    texts = {
        "max-connections": admission.admit("one more", peer)[1],
        "not-allowed": admission.access(PeerCredentials(1, 7, 7, frozenset({7})))[1],
        "groups-unknown": admission.access(PeerCredentials(1, 7, 7, None))[1],
    }
    per_uid = Admission(config, Limits.model_validate({"max-connections-per-uid": 1}))
    assert per_uid.admit("first", peer)[1] is None
    texts["max-connections-per-uid"] = per_uid.admit("second", peer)[1]
    for reason, text in texts.items():
        assert text is not None and refusal_reason(text) == reason, (reason, text)
    assert refusal_reason("the daemon is shutting down") == "shutting-down"
    assert refusal_reason("something new") == "other"
