"""Persistent blocks (docs/protocol.md §9): ``file`` blocks survive SIGKILL and SIGTERM and are
adopted at the next start; the memory-dir lock; entries that cannot be adopted are left
alone; ``memfd`` blocks round-trip through the fd store.

The fd store has no systemd here (it is not PID 1): :class:`FakeManager` plays the service
manager's side of the documented protocol (a ``NOTIFY_SOCKET`` datagram socket receiving
``FDSTORE=1`` with its fds, then the fds passed back as ``LISTEN_FDS``/``LISTEN_FDNAMES`` with
``LISTEN_PID`` set by a wrapper that execs the daemon). It is a harness, not systemd.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw, wait_job
from fdstore_support import FakeManager

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024


@pytest.fixture
def memory_dir() -> Iterator[Path]:
    """A not yet existing memory-dir on tmpfs, removed with its files after the test."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-persist-", dir="/dev/shm"))
    yield parent / "mem"
    shutil.rmtree(parent)


def _start(tmp: Path, memory_dir: Path, extra: str = "", **kw: Any) -> Daemon:
    """A daemon with its own log directory ``tmp`` (created) on ``memory_dir``."""
    tmp.mkdir(exist_ok=True)
    return Daemon(tmp, f'memory-dir = "{memory_dir}"\n{extra}', **kw)


def _read(raw: Raw, block: str, offset: int, length: int) -> bytes:
    data = raw.call("ram-block-read", id=block, offset=offset, length=length)["data"]
    return base64.b64decode(data)


def _write(raw: Raw, block: str, offset: int, data: bytes) -> None:
    raw.call("ram-block-write", id=block, offset=offset, data=base64.b64encode(data).decode())


def _sizes(raw: Raw) -> dict[str, tuple[int, int, str]]:
    return {b["id"]: (b["size"], b["max-size"], b["backend"]) for b in raw.call("query-ram-blocks")}


# -- crash ---------------------------------------------------------------------------------

BLOCKS = {"a": 2 * MiB, "b": 3 * MiB, "c": 1 * MiB}
CHUNK = 4096
CLIENTS = 8


class Writer(threading.Thread):
    """A client writing random chunks into its own slots until the daemon dies.

    ``acked[slot]``: sha256 of the last write to ``slot`` that was answered; ``inflight``:
    the write sent and not answered when the connection broke (it may or may not be in).
    """

    def __init__(self, path: Path, index: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.index = index
        self.acked: dict[tuple[str, int], str] = {}
        self.inflight: tuple[tuple[str, int], str] | None = None
        self.writes = 0

    def slots(self) -> list[tuple[str, int]]:
        out = []
        for block, size in BLOCKS.items():
            out += [(block, off) for off in range(self.index * CHUNK, size, CLIENTS * CHUNK)]
        return out

    def run(self) -> None:
        rng = random.Random(self.index)
        slots = self.slots()
        try:
            raw = Raw(self.path, timeout=30)
        except OSError:
            return
        with raw:
            while True:
                slot = rng.choice(slots)
                data = rng.randbytes(CHUNK)
                self.inflight = (slot, hashlib.sha256(data).hexdigest())
                try:
                    _write(raw, slot[0], slot[1], data)
                except (OSError, ValueError, AssertionError, json.JSONDecodeError):
                    return
                self.acked[slot] = self.inflight[1]
                self.inflight = None
                self.writes += 1


def test_sigkill_keeps_every_block_and_every_acknowledged_write(
    tmp_path: Path, memory_dir: Path
) -> None:
    d = _start(tmp_path / "1", memory_dir)
    with Raw(d.path) as raw:
        raw.call("ram-block-add", id="a", size=BLOCKS["a"], backend="file")
        # b is resizable and grown: its metadata is rewritten at the resize
        raw.call("ram-block-add", id="b", size=MiB, **{"max-size": 8 * MiB}, backend="file")
        raw.call("ram-block-resize", id="b", size=BLOCKS["b"])
        # c is deleted (file and metadata go) and added again
        raw.call("ram-block-add", id="c", size=4 * MiB, backend="file")
        raw.call("ram-block-del", id="c")
        raw.call("ram-block-add", id="c", size=BLOCKS["c"], backend="file")
        before = _sizes(raw)
    assert before == {
        "a": (2 * MiB, 2 * MiB, "file"),
        "b": (3 * MiB, 8 * MiB, "file"),
        "c": (MiB, MiB, "file"),
    }
    writers = [Writer(d.path, i) for i in range(CLIENTS)]
    for w in writers:
        w.start()
    deadline = time.monotonic() + 60
    while sum(w.writes for w in writers) < 400 and time.monotonic() < deadline:
        time.sleep(0.05)
    d.stop(signal.SIGKILL)
    for w in writers:
        w.join(30)
    assert sum(w.writes for w in writers) >= 400

    d2 = _start(tmp_path / "2", memory_dir)
    try:
        with Raw(d2.path) as raw:
            after = _sizes(raw)
            assert after == before and list(after) == ["a", "b", "c"]  # creation order
            checked = 0
            for w in writers:
                for slot, digest in w.acked.items():
                    got = hashlib.sha256(_read(raw, slot[0], slot[1], CHUNK)).hexdigest()
                    allowed = {digest}
                    if w.inflight is not None and w.inflight[0] == slot:
                        allowed.add(w.inflight[1])
                    assert got in allowed, (w.index, slot)
                    checked += 1
            assert checked > 0
    finally:
        assert d2.stop() == 0


# -- SIGTERM, replay, delete ---------------------------------------------------------------


def test_sigterm_keeps_file_blocks_announced_on_replay_and_del_removes_both_files(
    tmp_path: Path, memory_dir: Path
) -> None:
    d = _start(tmp_path / "1", memory_dir)
    with Raw(d.path) as raw:
        raw.call("ram-block-add", id="keep", size=4 * PAGE, backend="file", dump=False)
        raw.call("ram-block-add", id="big", size=2 * PAGE, backend="file", **{"max-size": MiB})
        raw.call("ram-block-resize", id="big", size=8 * PAGE)
        raw.call("ram-block-resize", id="big", size=3 * PAGE)  # shrink: metadata first
        raw.call("ram-block-add", id="anon", size=PAGE)
        _write(raw, "keep", PAGE, b"kept across restarts")
        _write(raw, "big", 2 * PAGE, b"tail page")
    assert d.stop() == 0
    meta = json.loads((memory_dir / "big.meta").read_text())
    assert (meta["size"], meta["max-size"], meta["resizable"]) == (3 * PAGE, MiB, True)
    assert meta["version"] == 1 and (memory_dir / "big").stat().st_size == 3 * PAGE

    d2 = _start(tmp_path / "2", memory_dir)
    with Raw(d2.path) as raw:
        result = raw.call("subscribe", events=["RAM_BLOCK_ADDED"])
        replayed = {e["params"]["data"]["id"]: e["params"]["data"] for e in raw.events}
        assert result["seq"] == 2 and set(replayed) == {"keep", "big"}
        assert replayed["big"]["replay"] is True and replayed["big"]["size"] == 3 * PAGE
        infos = {b["id"]: b for b in raw.call("query-ram-blocks")}
        assert infos["keep"]["dump"] is False and infos["keep"]["persistent"] is True
        assert infos["big"]["resizable"] is True and infos["big"]["max-size"] == MiB
        assert _read(raw, "keep", PAGE, 20) == b"kept across restarts"
        assert _read(raw, "big", 2 * PAGE, 9) == b"tail page"
        raw.call("ram-block-resize", id="big", size=4 * PAGE)  # still resizable
        raw.call("ram-block-del", id="keep")
    assert not (memory_dir / "keep").exists() and not (memory_dir / "keep.meta").exists()
    assert d2.stop() == 0
    assert json.loads((memory_dir / "big.meta").read_text())["size"] == 4 * PAGE


# -- the lock -------------------------------------------------------------------------------


def test_a_second_daemon_on_the_same_memory_dir_exits_1_naming_the_pid(
    tmp_path: Path, memory_dir: Path
) -> None:
    d = _start(tmp_path / "1", memory_dir, '[[block]]\nid = "f"\nsize = 4096\nbackend = "file"\n')
    try:
        assert (memory_dir / ".lock").read_text().strip() == str(d.pid)
        (tmp_path / "2").mkdir()
        cfg = tmp_path / "2" / "ramd.toml"
        cfg.write_text(f'memory-dir = "{memory_dir}"\n')
        second = subprocess.run(
            [sys.executable, "-m", "ramd", "--socket", str(tmp_path / "2" / "s"), "--config", cfg],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert f"memory-dir '{memory_dir}' is in use by another ramd (pid {d.pid})" in (
            second.stderr + second.stdout
        )
        assert d.alive() and (memory_dir / "f").exists()
    finally:
        assert d.stop() == 0
    # the lock went with the process: a daemon starts again
    d3 = _start(tmp_path / "3", memory_dir, '[[block]]\nid = "f"\nsize = 4096\nbackend = "file"\n')
    assert "RAM block 'f' kept from an earlier run" in d3.log_text()
    assert d3.stop() == 0


# -- what cannot be adopted ---------------------------------------------------------------


def _meta(block_id: str, size: int, max_size: int | None = None) -> str:
    return json.dumps(
        {
            "format": "ramd-block",
            "version": 1,
            "id": block_id,
            "size": size,
            "max-size": max_size or size,
            "resizable": max_size is not None,
            "page-size": PAGE,
            "created": 1,
            "settings": {},
        }
    )


def test_entries_that_cannot_be_adopted_are_logged_and_left_untouched(
    tmp_path: Path, memory_dir: Path
) -> None:
    memory_dir.mkdir(mode=0o700)
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * PAGE)
    entries: dict[str, bytes] = {
        "good": b"g" * 2 * PAGE,
        "good.meta": _meta("good", 2 * PAGE).encode(),
        "badjson": b"b" * PAGE,
        "badjson.meta": b"{not json",
        "badversion": b"v" * PAGE,
        "badversion.meta": _meta("badversion", PAGE)
        .replace('"version": 1', '"version": 9')
        .encode(),
        "short": b"s" * PAGE,  # the metadata claims more than the file backs
        "short.meta": _meta("short", 2 * PAGE).encode(),
        "long": b"l" * 3 * PAGE,  # longer than max-size
        "long.meta": _meta("long", PAGE, 2 * PAGE).encode(),
        "nometa": b"n" * PAGE,
        "orphan.meta": _meta("orphan", PAGE).encode(),
        "link.meta": _meta("link", PAGE).encode(),
        "grown": b"r" * 3 * PAGE,  # a grow interrupted before its metadata: takes 3 pages
        "grown.meta": _meta("grown", PAGE, 4 * PAGE).encode(),
    }
    for name, data in entries.items():
        (memory_dir / name).write_bytes(data)
    (memory_dir / "link").symlink_to(outside)
    (memory_dir / "adir").mkdir()
    (memory_dir / "adir.meta").write_text(_meta("adir", PAGE))
    d = _start(tmp_path / "d", memory_dir)
    try:
        with Raw(d.path) as raw:
            assert _sizes(raw) == {
                "grown": (3 * PAGE, 4 * PAGE, "file"),
                "good": (2 * PAGE, 2 * PAGE, "file"),
            }
            assert _read(raw, "good", PAGE, 4) == b"gggg"
            assert _read(raw, "grown", 2 * PAGE, 4) == b"rrrr"
        log = d.log_text()
        for name, why in [
            ("badjson", "not JSON"),
            ("badversion", "unsupported version 9"),
            ("short", "size mismatch"),
            ("long", "size mismatch"),
            ("nometa", "no metadata"),
            ("orphan.meta", "metadata without its block file"),
            ("link", "a symbolic link"),
            ("adir", "not a regular file"),
        ]:
            assert f"'{name}' not adopted" in log and why in log, (name, why)
        for name, data in entries.items():
            if not name.startswith(("good", "grown")):
                assert (memory_dir / name).read_bytes() == data, name
        assert os.readlink(memory_dir / "link") == str(outside)
        assert outside.read_bytes() == b"x" * PAGE and (memory_dir / "adir").is_dir()
        # an unadopted name stays taken: it is never overwritten
        with Raw(d.path) as raw:
            err = raw.error("ram-block-add", id="nometa", size=PAGE, backend="file")
            assert "already exists" in err["message"]
    finally:
        assert d.stop() == 0
    assert json.loads((memory_dir / "grown.meta").read_text())["size"] == 3 * PAGE


def test_a_config_block_must_match_the_adopted_one(tmp_path: Path, memory_dir: Path) -> None:
    block = '[[block]]\nid = "f"\nsize = "8K"\nmax-size = "1M"\nbackend = "file"\n'
    d = _start(tmp_path / "1", memory_dir, block)
    with Raw(d.path) as raw:
        raw.call("ram-block-resize", id="f", size=64 * 1024)
        _write(raw, "f", 60 * 1024, b"resized at runtime")
    assert d.stop() == 0
    d2 = _start(tmp_path / "2", memory_dir, block)  # same entry: the adopted block wins
    with Raw(d2.path) as raw:
        assert _sizes(raw) == {"f": (64 * 1024, MiB, "file")}
        assert _read(raw, "f", 60 * 1024, 18) == b"resized at runtime"
    assert d2.stop() == 0
    (tmp_path / "3").mkdir()
    cfg = tmp_path / "3" / "ramd.toml"
    cfg.write_text(f'memory-dir = "{memory_dir}"\n' + block.replace('"1M"', '"2M"'))
    third = subprocess.run(
        [sys.executable, "-m", "ramd", "--socket", str(tmp_path / "3" / "s"), "--config", cfg],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert third.returncode == 2
    assert "config: block[0]: RAM block 'f' was kept from an earlier run" in third.stderr
    assert (memory_dir / "f").stat().st_size == 64 * 1024


# -- the fd store, with a harness playing the service manager (not systemd) ---------------


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    m = FakeManager(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(m.path))
    yield m
    m.close()


def test_memfd_blocks_survive_a_restart_through_the_fd_store(
    tmp_path: Path, manager: FakeManager
) -> None:
    d = manager.start(tmp_path / "1")
    with Raw(d.path) as raw:
        raw.call("ram-block-add", id="m", size=16 * PAGE, backend="memfd", **{"max-size": MiB})
        raw.call("ram-block-resize", id="m", size=32 * PAGE)
        raw.call("ram-block-add", id="n.2", size=4 * PAGE, backend="memfd", dump=False)
        raw.call("ram-block-add", id="gone", size=PAGE, backend="memfd")
        raw.call("ram-block-add", id="anon", size=PAGE)
        raw.call("ram-block-del", id="gone")
        _write(raw, "m", 31 * PAGE, b"grown tail")
        _write(raw, "n.2", 0, b"second block")
    assert d.stop() == 0
    manager.drain()
    assert sorted(manager.stored) == ["ram.-.n.n.2", f"ram.{MiB:x}.-.m"]
    assert {"FDSTOREREMOVE": "1", "FDNAME": "ram.-.-.gone"} in manager.messages
    assert any(m.get("READY") == "1" for m in manager.messages)

    d2 = manager.start(tmp_path / "2")
    try:
        with Raw(d2.path) as raw:
            infos = {b["id"]: b for b in raw.call("query-ram-blocks")}
            assert set(infos) == {"m", "n.2"}
            m, n = infos["m"], infos["n.2"]
            assert (m["size"], m["max-size"], m["resizable"], m["backend"]) == (
                32 * PAGE,
                MiB,
                True,
                "memfd",
            )
            assert (n["size"], n["resizable"], n["dump"]) == (4 * PAGE, False, False)
            assert _read(raw, "m", 31 * PAGE, 10) == b"grown tail"
            assert _read(raw, "n.2", 0, 12) == b"second block"
            raw.call("ram-block-resize", id="m", size=64 * PAGE)
            raw.call("ram-block-del", id="n.2")
        assert "fd store: adopted RAM block 'm'" in d2.log_text()
    finally:
        assert d2.stop() == 0
    manager.drain()
    assert list(manager.stored) == [f"ram.{MiB:x}.-.m"]  # adopted blocks are not pushed twice


def test_fd_store_adoption_keeps_max_used(tmp_path: Path, manager: FakeManager) -> None:
    """Issue 21 point 9: blocks passed back from the fd store were adopted past max-used."""
    d = manager.start(tmp_path / "1")
    with Raw(d.path) as raw:
        for block_id in ("a", "b"):
            raw.call("ram-block-add", id=block_id, size=16 * PAGE, backend="memfd")
    assert d.stop() == 0
    manager.drain()
    d2 = manager.start(tmp_path / "2", f"[limits]\nmax-used = {20 * PAGE}\n")
    try:
        with Raw(d2.path) as raw:
            assert len(raw.call("query-ram-blocks")) == 1
            assert raw.call("query-stats")["used"] == 16 * PAGE
        assert f"not adopted (0x{16 * PAGE:x} bytes: max-used is {20 * PAGE}" in d2.log_text()
    finally:
        assert d2.stop() == 0


def test_a_sealed_memfd_block_stays_sealed_across_the_fd_store(
    tmp_path: Path, manager: FakeManager
) -> None:
    """docs/protocol.md §14: the seals belong to the memfd, so the adopted block is a template
    again, mapped read-only by the new daemon (a writable mapping would be refused)."""
    d = manager.start(tmp_path / "1")
    with Raw(d.path) as raw:
        raw.call("ram-block-add", id="tpl", size=8 * PAGE, backend="memfd")
        _write(raw, "tpl", PAGE, b"sealed template")
        raw.call("ram-block-seal", id="tpl")
    assert d.stop() == 0
    manager.drain()
    assert list(manager.stored) == ["ram.-.-.tpl"]

    d2 = manager.start(tmp_path / "2")
    try:
        with Raw(d2.path) as raw:
            (info,) = raw.call("query-ram-blocks")
            assert (info["id"], info["sealed"], info["size"]) == ("tpl", True, 8 * PAGE)
            assert _read(raw, "tpl", PAGE, 15) == b"sealed template"
            err = raw.error("ram-block-write", id="tpl", offset=0, data="eA==")
            assert err["message"] == "RAM block 'tpl' is sealed"
            maps = Path(f"/proc/{d2.pid}/maps").read_text().splitlines()
            (view,) = [line for line in maps if "memfd:ramd:tpl" in line]
            assert view.split()[1].startswith("r--s"), view
        assert "fd store: adopted RAM block 'tpl'" in d2.log_text()
    finally:
        assert d2.stop() == 0


def test_a_memfd_block_created_by_a_load_goes_to_the_fd_store(
    tmp_path: Path, manager: FakeManager
) -> None:
    d = manager.start(tmp_path / "1")
    with Raw(d.path) as raw:
        raw.call("ram-block-add", id="img", size=8 * PAGE, backend="memfd")
        _write(raw, "img", 3 * PAGE, b"saved, deleted, loaded")
        job = raw.call("ram-save", target={"file": "snap"})["job-id"]
        wait_job(raw, job)
        raw.call("ram-block-del", id="img")
        job = raw.call("ram-load", source={"file": "snap"})["job-id"]
        assert "error" not in wait_job(raw, job)
    assert d.stop() == 0
    manager.drain()
    assert list(manager.stored) == ["ram.-.-.img"]
    d2 = manager.start(tmp_path / "2")
    try:
        with Raw(d2.path) as raw:
            assert [b["id"] for b in raw.call("query-ram-blocks")] == ["img"]
            assert _read(raw, "img", 3 * PAGE, 22) == b"saved, deleted, loaded"
    finally:
        assert d2.stop() == 0
