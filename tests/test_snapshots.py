"""ram-save / ram-load / jobs on a real daemon (docs/protocol.md §10, issue 13)."""

from __future__ import annotations

import array
import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw, wait_job

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = 4 * MiB


def wait_running(raw: Raw, job_id: str) -> dict[str, Any]:
    """Until the job is running and has made progress (it must still be running then)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = next(j for j in raw.call("query-jobs") if j["id"] == job_id)
        assert job["status"] != "concluded", job
        if job["status"] == "running" and job["current-progress"] > 0:
            return job  # type: ignore[no-any-return]
        time.sleep(0.01)
    raise AssertionError("job not running")


def state(raw: Raw) -> dict[str, tuple[int, str]]:
    """id -> (size, sha256 of the used range) of every block."""
    out = {}
    for b in raw.call("query-ram-blocks"):
        h = hashlib.sha256()
        for off in range(0, b["size"], CHUNK):
            n = min(CHUNK, b["size"] - off)
            h.update(
                base64.b64decode(
                    raw.call("ram-block-read", id=b["id"], offset=off, length=n)["data"]
                )
            )
        out[b["id"]] = (b["size"], h.hexdigest())
    return out


def write(raw: Raw, block: str, offset: int, data: bytes) -> None:
    for pos in range(0, len(data), 2 * MiB):
        part = base64.b64encode(data[pos : pos + 2 * MiB]).decode()
        raw.call("ram-block-write", id=block, offset=offset + pos, data=part)


def save(raw: Raw, name: str, **kw: Any) -> dict[str, Any]:
    return wait_job(raw, raw.call("ram-save", target={"file": name}, **kw)["job-id"])


def load(raw: Raw, name: str) -> dict[str, Any]:
    return wait_job(raw, raw.call("ram-load", source={"file": name})["job-id"])


@pytest.fixture
def start(tmp_path: Path) -> Any:
    started: list[Daemon] = []

    def run(config: str = "") -> Daemon:
        (tmp_path / "mem").mkdir(mode=0o700, exist_ok=True)
        d = Daemon(tmp_path, f'memory-dir = "{tmp_path / "mem"}"\n' + config)
        started.append(d)
        return d

    yield run
    for d in started:
        d.stop()


def _events(raw: Raw, name: str) -> list[dict[str, Any]]:
    return [e["params"]["data"] for e in raw.events if e["method"] == name]


def test_save_scribble_resize_load_restores_sizes_and_contents(start: Any, tmp_path: Path) -> None:
    d = start()
    with Raw(d.path) as r:
        r.call("ram-block-add", id="a", size=MiB, **{"max-size": 16 * MiB})
        r.call("ram-block-add", id="b", size=2 * MiB, backend="memfd")
        r.call("ram-block-add", id="c", size=3 * MiB, backend="file", **{"max-size": 8 * MiB})
        write(r, "a", 4096, os.urandom(100_000))
        write(r, "b", 0, os.urandom(2 * MiB))
        write(r, "c", MiB + 123, os.urandom(5000))
        before = state(r)
        job = save(r, "snap")
        assert "error" not in job and job["current-progress"] == job["total-progress"] == 6 * MiB
        assert os.listdir(tmp_path / "state") == ["snap"]
        r.call("ram-block-resize", id="a", size=8 * MiB)
        write(r, "a", 0, os.urandom(8 * MiB - 4096))
        write(r, "b", 4096, b"scribble")
        r.call("ram-block-del", id="c")
        r.call("ram-block-add", id="other", size=MiB)
        write(r, "other", 0, b"untouched")
        other = state(r)["other"]
        r.call("subscribe", replay=False)
        job = load(r, "snap")
        assert "error" not in job, job
        after = state(r)
        assert {k: after[k] for k in before} == before
        assert after["other"] == other
        resized = _events(r, "RAM_BLOCK_RESIZED")
        assert [(e["id"], e["old-size"], e["new-size"]) for e in resized] == [("a", 8 * MiB, MiB)]
        added = _events(r, "RAM_BLOCK_ADDED")
        assert [(e["id"], e["size"], e["max-size"], e["backend"]) for e in added] == [
            ("c", 3 * MiB, 8 * MiB, "file")
        ]
        statuses = [(e["id"], e["status"]) for e in _events(r, "JOB_STATUS_CHANGE")]
        jid = job["id"]
        assert statuses == [(jid, "created"), (jid, "running"), (jid, "concluded")]
        seqs = [e["params"]["data"]["seq"] for e in r.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_load_into_fresh_memory_checks_and_copies_in_one_pass(start: Any) -> None:
    """Missing blocks that are not persistent are loaded by the verification pass itself
    (progress counts their bytes once); a ``file`` block is created after verification and
    copied by a second pass. The blocks appear in image order, each once."""
    d = start()
    with Raw(d.path) as r:
        r.call("ram-block-add", id="a", size=MiB, **{"max-size": 16 * MiB})
        r.call("ram-block-add", id="f", size=3 * MiB, backend="file")
        r.call("ram-block-add", id="b", size=2 * MiB, backend="memfd", dump=False)
        write(r, "a", 4096, os.urandom(100_000))
        write(r, "f", MiB, os.urandom(MiB))
        write(r, "b", 0, os.urandom(2 * MiB))
        before = state(r)
        save(r, "snap")
        for block in ("a", "f", "b"):
            r.call("ram-block-del", id=block)
        r.call("subscribe", replay=False)
        job = load(r, "snap")
        assert "error" not in job, job
        # a and b (3 MiB) once, f (3 MiB) checked, then copied: 9 MiB, not 12
        assert job["current-progress"] == job["total-progress"] == 9 * MiB
        assert state(r) == before
        added = _events(r, "RAM_BLOCK_ADDED")
        assert [(e["id"], e["size"], e["backend"]) for e in added] == [
            ("a", MiB, "anonymous"),
            ("f", 3 * MiB, "file"),
            ("b", 2 * MiB, "memfd"),
        ]
        infos = {b["id"]: b for b in r.call("query-ram-blocks")}
        assert infos["a"]["max-size"] == 16 * MiB and infos["b"]["dump"] is False


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree"))


def _hole_image(path: Path, blocks: list[tuple[str, int]]) -> None:
    """An image of all-zero ``memfd`` blocks, made with the format library without scanning
    zeros: every block is one hole, so the file takes no disk space."""
    from dataclasses import replace

    from ramd.snapshot import BlockDescriptor
    from ramd.snapshot.format import BlockHasher, finish, layout

    descs = [BlockDescriptor(i, n, n, False, 4096, "memfd") for i, n in blocks]
    info, table_length = layout(descs)
    sealed = []
    for block in info.blocks:
        hasher = BlockHasher()
        hasher.add_zero_chunks(block.size // info.chunk_size, info.chunk_size)
        sealed.append(replace(block, digest=hasher.digest()))
    info, meta = finish(replace(info, blocks=tuple(sealed)), table_length)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(info.file_length)
        f.write(meta)


def test_fresh_memfd_blocks_the_host_cannot_hold_together_are_refused(
    start: Any, tmp_path: Path
) -> None:
    """Blocks a load creates are not fallocated, but each is checked against MemAvailable
    with the others not yet filled counted in, as their fallocates in turn would be."""
    d = start('[limits]\nmax-used = "1T"\n')
    size = _mem_available() * 3 // 4 // GiB * GiB  # each fits, both do not
    _hole_image(tmp_path / "state" / "huge", [("m1", size), ("m2", size)])
    with Raw(d.path) as r:
        r.call("subscribe", replay=False)
        job = load(r, "huge")
        assert job["error"] == (
            f"Cannot allocate RAM block 'm2' of 0x{size:x}: Cannot allocate memory"
        ), job
        assert r.call("query-ram-blocks") == []
        assert _events(r, "RAM_BLOCK_ADDED") == []


def test_a_mostly_zero_gib_block_gives_a_sparse_image(start: Any, tmp_path: Path) -> None:
    d = start()
    with Raw(d.path) as r:
        r.call("ram-block-add", id="big", size=GiB)
        data = os.urandom(MiB)
        write(r, "big", 512 * MiB, data)
        save(r, "sparse")
        st = os.stat(tmp_path / "state" / "sparse")
        assert st.st_size > GiB
        assert st.st_blocks * 512 < GiB // 100, st.st_blocks * 512
        write(r, "big", 512 * MiB, b"\0" * 4096)
        write(r, "big", 0, b"x" * 4096)
        assert "error" not in load(r, "sparse")
        got = base64.b64decode(
            r.call("ram-block-read", id="big", offset=512 * MiB, length=MiB)["data"]
        )
        assert got == data
        head = r.call("ram-block-read", id="big", offset=0, length=4096)["data"]
        assert base64.b64decode(head) == bytes(4096)


def _corrupt_flip(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - MiB // 2)  # inside the last block's data
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _corrupt_version(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write((2).to_bytes(4, "little"))


CASES: dict[str, tuple[Callable[[Path], None] | None, Callable[[Raw], None], str]] = {
    "flipped byte": (_corrupt_flip, lambda r: None, "Bad image: checksum mismatch in block 'z'"),
    "wrong version": (_corrupt_version, lambda r: None, "unsupported version 2"),
    "size mismatch": (
        None,
        lambda r: (
            r.call("ram-block-del", id="fixed"),
            r.call("ram-block-add", id="fixed", size=2 * MiB),
        ),
        "Size mismatch: fixed: 0x100000 != 0x200000: Invalid argument",
    ),
    "size too large": (
        None,
        lambda r: (
            r.call("ram-block-del", id="grow"),
            r.call("ram-block-add", id="grow", size=MiB, **{"max-size": 2 * MiB}),
        ),
        "Size too large: grow: 0x400000 > 0x200000: Invalid argument",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_image_fails_the_load_and_changes_nothing(
    start: Any, tmp_path: Path, case: str
) -> None:
    corrupt, change, message = CASES[case]
    d = start()
    with Raw(d.path) as r:
        r.call("ram-block-add", id="grow", size=4 * MiB, **{"max-size": 8 * MiB})
        r.call("ram-block-add", id="fixed", size=MiB)
        r.call("ram-block-add", id="z", size=MiB)
        for block in ("grow", "fixed", "z"):
            write(r, block, 8192, os.urandom(MiB // 2))
        save(r, "img")
        r.call("ram-block-del", id="z")
        r.call("ram-block-resize", id="grow", size=6 * MiB)
        change(r)
        write(r, "grow", 0, b"changed since")
        if corrupt is not None:
            corrupt(tmp_path / "state" / "img")
        before = state(r)
        r.call("subscribe", replay=False)
        job = load(r, "img")
        assert job["error"] == message or message in job["error"], job
        assert state(r) == before
        assert [e["method"] for e in r.events] == ["JOB_STATUS_CHANGE"] * 4  # ..., aborting
        assert [e["params"]["data"]["status"] for e in r.events][-2:] == ["aborting", "concluded"]


def _big_file_block(r: Raw, tmp_path: Path, size: int = GiB) -> None:
    """A file block full of non-zero data, written straight into its file (fast)."""
    r.call("ram-block-add", id="big", size=size, backend="file")
    pattern = os.urandom(MiB)
    fd = os.open(tmp_path / "mem" / "big", os.O_WRONLY)
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, pattern, off)
    finally:
        os.close(fd)


def test_a_block_being_saved_is_busy_and_a_cancelled_save_leaves_no_file(
    start: Any, tmp_path: Path
) -> None:
    d = start()
    with Raw(d.path) as r:
        _big_file_block(r, tmp_path)
        r.call("subscribe", replay=False)
        jid = r.call("ram-save", target={"file": "cancelled"})["job-id"]
        job = wait_running(r, jid)
        assert job["total-progress"] == GiB and 0 < job["current-progress"] <= GiB
        busy = "RAM block 'big' is busy: it is being saved"
        assert r.error("ram-block-resize", id="big", size=MiB)["message"] == busy
        assert r.error("ram-block-del", id="big")["message"] == busy
        assert r.error("ram-block-discard", id="big", offset=0, length=4096)["message"] == busy
        assert r.error("ram-block-write", id="big", offset=0, data="AA==")["message"] == busy
        assert r.call("ram-block-read", id="big", offset=0, length=1)  # reads are fine
        r.call("job-cancel", id=jid)
        job = wait_job(r, jid)
        assert job["error"] == "Operation canceled"
        assert os.listdir(tmp_path / "state") == []
        statuses = [e["status"] for e in _events(r, "JOB_STATUS_CHANGE")]
        assert statuses == ["created", "running", "aborting", "concluded"]
        assert r.call("ram-block-discard", id="big", offset=0, length=4096) == {}
        r.call("job-dismiss", id=jid)
        assert r.call("query-jobs") == []
        assert _events(r, "JOB_STATUS_CHANGE")[-1] == {
            "seq": r.events[-1]["params"]["data"]["seq"],
            "id": jid,
            "status": "null",
        }
        assert r.error("job-dismiss", id=jid)["message"] == "Job not found"


def test_sigkill_during_a_save_leaves_the_previous_image(start: Any, tmp_path: Path) -> None:
    d = start()
    with Raw(d.path) as r:
        r.call("ram-block-add", id="small", size=MiB)
        write(r, "small", 0, b"first image")
        save(r, "snap")
        first = (tmp_path / "state" / "snap").read_bytes()
        _big_file_block(r, tmp_path)
        wait_running(r, r.call("ram-save", target={"file": "snap"})["job-id"])
    d.stop(signal.SIGKILL)
    assert (tmp_path / "state" / "snap").read_bytes() == first
    assert any(n.endswith(".tmp") for n in os.listdir(tmp_path / "state"))
    (tmp_path / "mem" / "big").unlink()
    d2 = start()
    with Raw(d2.path) as r:
        assert "error" not in load(r, "snap")
        assert (
            base64.b64decode(r.call("ram-block-read", id="small", offset=0, length=11)["data"])
            == b"first image"
        )
    assert os.listdir(tmp_path / "state") == ["snap"]  # the dead writer's temporary is gone


def _send_with_fd(r: Raw, msg: dict[str, Any], fd: int) -> Any:
    data = json.dumps(msg).encode()
    r.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    return r.reply()


def test_save_to_and_load_from_an_fd_passed_with_getfd(start: Any, tmp_path: Path) -> None:
    d = start()
    image = tmp_path / "outside.img"
    with Raw(d.path) as r:
        r.call("ram-block-add", id="a", size=2 * MiB, **{"max-size": 4 * MiB})
        write(r, "a", 100, os.urandom(MiB))
        before = state(r)
        fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            msg = {"jsonrpc": "2.0", "id": "g", "method": "getfd", "params": {"fdname": "img"}}
            assert _send_with_fd(r, msg, fd)["result"] == {}
        finally:
            os.close(fd)
        job = wait_job(r, r.call("ram-save", target={"fd": "img"})["job-id"])
        assert "error" not in job, job
        r.call("closefd", fdname="img")
        assert image.stat().st_size > 2 * MiB
        r.call("ram-block-resize", id="a", size=4 * MiB)
        write(r, "a", 100, b"scribble")
        fd = os.open(image, os.O_RDONLY)
        try:
            msg = {"jsonrpc": "2.0", "id": "h", "method": "getfd", "params": {"fdname": "src"}}
            assert _send_with_fd(r, msg, fd)["result"] == {}
        finally:
            os.close(fd)
        job = wait_job(r, r.call("ram-load", source={"fd": "src"})["job-id"])
        assert "error" not in job, job
        assert state(r) == before
        assert r.error("ram-load", source={"fd": "nope"})["message"] == (
            "File descriptor named 'nope' not found"
        )


def test_a_cancelled_save_to_an_fd_leaves_the_file_empty(start: Any, tmp_path: Path) -> None:
    """The client owns an fd target: ramd cannot remove it, so a cancel truncates it."""
    d = start()
    image = tmp_path / "outside.img"
    image.write_bytes(b"previous contents")
    with Raw(d.path) as r:
        _big_file_block(r, tmp_path)
        fd = os.open(image, os.O_RDWR)
        try:
            msg = {"jsonrpc": "2.0", "id": "g", "method": "getfd", "params": {"fdname": "img"}}
            assert _send_with_fd(r, msg, fd)["result"] == {}
        finally:
            os.close(fd)
        jid = r.call("ram-save", target={"fd": "img"})["job-id"]
        wait_running(r, jid)
        r.call("job-cancel", id=jid)
        assert wait_job(r, jid)["error"] == "Operation canceled"
        assert image.stat().st_size == 0
        assert r.call("ram-block-discard", id="big", offset=0, length=4096) == {}


def test_ramctl_save_load_and_jobs(start: Any, tmp_path: Path) -> None:
    d = start()

    def ramctl(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ramd_client.cli", "--socket", str(d.path), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    with Raw(d.path) as r:
        r.call("ram-block-add", id="a", size=MiB, **{"max-size": 2 * MiB})
        write(r, "a", 0, b"saved by ramctl")
        before = state(r)
        done = ramctl("save", "cli")
        assert done.returncode == 0, done.stderr
        assert r.call("query-jobs") == []  # a waited job is dismissed
        r.call("ram-block-resize", id="a", size=2 * MiB)
        done = ramctl("load", "cli")
        assert done.returncode == 0, done.stderr
        assert state(r) == before
        failed = ramctl("load", "missing")
        assert failed.returncode == 1 and "Image 'missing' not found" in failed.stderr
        (tmp_path / "state" / "bad").write_bytes(b"RAMDIMG\0" + bytes(200))
        failed = ramctl("load", "bad")
        assert failed.returncode == 1 and "Bad image" in failed.stderr, failed.stderr
        queued = ramctl("save", "later", "--no-wait")
        assert queued.returncode == 0
        jid = queued.stdout.strip()
        wait_job(r, jid)
        listing = ramctl("jobs")
        assert listing.returncode == 0 and jid in listing.stdout and "concluded" in listing.stdout
        as_json = json.loads(ramctl("jobs", "--json").stdout)
        assert [(j["id"], j["type"], j["status"]) for j in as_json] == [
            (jid, "ram-save", "concluded")
        ]
