"""``file`` blocks in memory-dir across crashes (docs/protocol.md §9): a SIGKILL while a block is
being created never leaves a file that blocks its id; the daemon removes only its own
temporary files at start; adoption keeps ``max-used`` and logs names escaped. Real daemon,
real SIGKILL, real tmpfs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw

MiB = 1 << 20
BIG = 1024 * MiB


@pytest.fixture
def memory_dir() -> Iterator[Path]:
    """A not yet existing memory-dir on tmpfs, removed with its files after the test."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-files-", dir="/dev/shm"))
    yield parent / "mem"
    shutil.rmtree(parent)


def _start(tmp: Path, memory_dir: Path, extra: str = "") -> Daemon:
    tmp.mkdir(exist_ok=True)
    return Daemon(tmp, f'memory-dir = "{memory_dir}"\n{extra}')


def _entries(memory_dir: Path) -> set[str]:
    try:
        return set(os.listdir(memory_dir)) - {".lock"}
    except FileNotFoundError:
        return set()


def _kill_while_creating(d: Daemon, memory_dir: Path, block: str) -> set[str]:
    """Ask for a 1 GiB ``file`` block and SIGKILL the daemon as soon as its file exists
    without metadata (while its memory is allocated); what memory-dir held then ("missed"
    if the window had passed before the kill)."""
    conn = Raw(d.path)
    add = {"jsonrpc": "2.0", "id": 1, "method": "ram-block-add"}
    add["params"] = {"id": block, "size": BIG, "backend": "file"}
    conn.send(json.dumps(add).encode())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = _entries(memory_dir)
        if block + ".meta" in names:
            break
        if any(block in n for n in names):
            d.proc.send_signal(signal.SIGKILL)
            break
    d.stop(signal.SIGKILL)
    conn.close()
    names = _entries(memory_dir)
    return {"missed"} if block + ".meta" in names else names


def test_a_kill_while_a_file_block_is_created_never_blocks_its_id(
    tmp_path: Path, memory_dir: Path
) -> None:
    hit = None
    for attempt in range(5):
        d = _start(tmp_path / f"run{attempt}", memory_dir)
        left = _kill_while_creating(d, memory_dir, f"big{attempt}")
        if left != {"missed"}:
            hit = attempt, left
            break
        shutil.rmtree(memory_dir)
    assert hit is not None, "the kill never landed while a block file was being created"
    attempt, left = hit
    block = f"big{attempt}"
    assert left == {f".{block}.new"}  # never a file under the block's own name
    d = _start(tmp_path / "after", memory_dir)
    try:
        assert _entries(memory_dir) == set()  # the leftover is gone
        assert f"removed '.{block}.new'" in d.log_text()
        with Raw(d.path) as r:
            assert r.call("query-ram-blocks") == []
            r.call("ram-block-add", id=block, size=MiB, backend="file")
        assert _entries(memory_dir) == {block, block + ".meta"}
    finally:
        d.stop(signal.SIGKILL)
    d = _start(tmp_path / "again", memory_dir)
    try:
        with Raw(d.path) as r:
            assert [b["id"] for b in r.call("query-ram-blocks")] == [block]
    finally:
        d.stop()


def test_repeated_kills_during_adds_leave_every_id_adopted_or_free(
    tmp_path: Path, memory_dir: Path
) -> None:
    """Kills at staggered moments of a stream of adds; after each restart every id is
    either adopted or can be added again, and no temporary file stays."""
    ids = [f"k{i}" for i in range(6)]
    for run in range(8):
        d = _start(tmp_path / f"run{run}", memory_dir)
        with Raw(d.path) as r:
            present = {b["id"] for b in r.call("query-ram-blocks")}
            assert not any(n.startswith(".") for n in _entries(memory_dir))
            for block in ids:
                if block not in present:
                    r.call("ram-block-add", id=block, size=MiB, backend="file")
                r.call("ram-block-del", id=block)
            for block in ids:
                r.send(
                    json.dumps(
                        {
                            "jsonrpc": "2.0",
                            "id": block,
                            "method": "ram-block-add",
                            "params": {"id": block, "size": 64 * MiB, "backend": "file"},
                        }
                    ).encode()
                )
            time.sleep(0.002 * run * run)
            d.stop(signal.SIGKILL)
    d = _start(tmp_path / "last", memory_dir)
    try:
        with Raw(d.path) as r:
            present = {b["id"] for b in r.call("query-ram-blocks")}
            for block in set(ids) - present:
                r.call("ram-block-add", id=block, size=MiB, backend="file")
    finally:
        d.stop()


def test_only_the_daemons_own_leftovers_are_removed_at_start(
    tmp_path: Path, memory_dir: Path
) -> None:
    memory_dir.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("not ramd's")
    (memory_dir / ".a.new").write_text("x")
    (memory_dir / ".b.meta.tmp").write_text("x")
    (memory_dir / ".c.new").symlink_to(outside)
    (memory_dir / ".d.new").mkdir()
    kept = {".c.new", ".d.new", ".other", "e.new", ".1.new", "f.meta.tmp"}
    for name in kept - {".c.new", ".d.new"}:
        (memory_dir / name).write_text("x")
    d = _start(tmp_path / "second", memory_dir)
    try:
        assert _entries(memory_dir) == kept
        assert outside.read_text() == "not ramd's"
        assert "'.d.new' is not a regular file: left untouched" in d.log_text()
    finally:
        d.stop()


def test_adoption_keeps_max_used_and_leaves_the_rest_untouched(
    tmp_path: Path, memory_dir: Path
) -> None:
    d = _start(tmp_path / "first", memory_dir)
    with Raw(d.path) as r:
        for block in ("a", "b", "c"):
            r.call("ram-block-add", id=block, size=MiB, backend="file")
    d.stop()
    files = {n: (memory_dir / n).read_bytes() for n in _entries(memory_dir)}
    d = _start(tmp_path / "limited", memory_dir, '[limits]\nmax-used = "2M"\n')
    try:
        with Raw(d.path) as r:
            assert [b["id"] for b in r.call("query-ram-blocks")] == ["a", "b"]
            assert r.call("query-stats")["used"] == 2 * MiB
        assert "'c' not adopted (0x100000 bytes: max-used is 2097152" in d.log_text()
    finally:
        d.stop()
    assert {n: (memory_dir / n).read_bytes() for n in _entries(memory_dir)} == files
    d = _start(tmp_path / "unlimited", memory_dir)
    try:
        with Raw(d.path) as r:
            assert [b["id"] for b in r.call("query-ram-blocks")] == ["a", "b", "c"]
    finally:
        d.stop()


def test_adoption_logs_names_with_control_characters_escaped(
    tmp_path: Path, memory_dir: Path
) -> None:
    memory_dir.mkdir(parents=True)
    (memory_dir / "evil\n2026 forged line \x1b[31m").write_text("x")
    d = _start(tmp_path / "d", memory_dir)
    try:
        log = d.log_text()
        assert "'evil\\x0a2026 forged line \\x1b[31m' not adopted (no metadata)" in log
        assert "\x1b" not in log and "\n2026 forged" not in log
    finally:
        d.stop()
