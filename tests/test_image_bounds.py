"""Hostile images that are self-consistent (their checksums are unkeyed, so anyone can seal
one: built here from docs/image-format.md) get a clean image error from ``ram-load``, and a
load's work on the event loop is sliced so other clients are served meanwhile
(docs/protocol.md §10, §11). Real daemon, real files in its state-dir."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xxhash
from daemon import Daemon, Raw, wait_job

ALIGN = 4096
CHUNK = 256 * 1024
HEADER = struct.Struct("<8sIIIIII QQQQ")


def seal(table: bytes, data_length: int = 0) -> tuple[bytes, int]:
    """The header, table and padding of an image with this table and ``data_length`` bytes
    of (zero) block data after them, and the image's whole length."""
    data_offset = (128 + len(table) + ALIGN - 1) // ALIGN * ALIGN
    length = data_offset + data_length
    fields = HEADER.pack(
        b"RAMDIMG\0", 1, 0, 128, CHUNK, ALIGN, 0, 128, len(table), data_offset, length
    )
    meta = table + bytes(data_offset - 128 - len(table))
    head = fields + xxhash.xxh3_128_digest(fields + meta) + bytes(32)
    return head + xxhash.xxh3_128_digest(head) + meta, length


def _entry(block_id: str, offset: int, size: int = ALIGN, **extra: Any) -> str:
    entry = {
        "id": block_id,
        "size": size,
        "max-size": size,
        "resizable": False,
        "page-size": ALIGN,
        "backend": "anonymous",
        "settings": {},
        "offset": offset,
        "digest": "00" * 16,
    }
    return json.dumps({**entry, **extra}, separators=(",", ":"))


def _table(entries: list[str]) -> bytes:
    return ('{"format":"ramd-image","blocks":[' + ",".join(entries) + "]}").encode()


def _back_to_back(ids: list[str], **extra: Any) -> bytes:
    """A table of one-page blocks ``ids`` whose offsets follow each other from the data
    offset (which depends on the table's own length: found by iterating to a fixed point)."""
    data_offset = 0
    while True:
        table = _table([_entry(b, data_offset + i * ALIGN, **extra) for i, b in enumerate(ids)])
        needed = (128 + len(table) + ALIGN - 1) // ALIGN * ALIGN
        if needed == data_offset:
            return table
        data_offset = needed


def _place(d: Daemon, name: str, table: bytes, data_length: int = 0) -> None:
    """Write the image into the daemon's state-dir (data as a hole: it is never reached)."""
    state = d.dir / "state"
    state.mkdir(exist_ok=True)
    head, length = seal(table, data_length)
    with open(state / name, "wb") as f:
        f.write(head)
        f.truncate(length)


def _load_error(d: Daemon, name: str) -> str:
    with Raw(d.path) as r:
        job = r.call("ram-load", source={"file": name})["job-id"]
        info = wait_job(r, job)
        assert r.call("query-ram-blocks") == []
        return str(info["error"])


DEEP = 100_000


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            _table([_entry("a", 0)]).replace(
                b'"settings":{}', b'"settings":{"x":' + b"[" * DEEP + b"]" * DEEP + b"}"
            ),
            "Bad image: block table nests too deep",
        ),
        (
            b'{"format":"ramd-image","blocks":' + b"[" * DEEP + b"]" * DEEP + b"}",
            "Bad image: block table nests too deep",
        ),
        (b'{"format":"ramd-image","blocks":[', "Bad image: block table is not JSON"),
        (
            _table([_entry("a", 0)]).replace(b'"size":4096', b'"size":' + b"7" * 5000),
            "Bad image: block table: an integer of 5000 digits",
        ),
        (
            _table([_entry("a", 0)]).replace(b'"size":4096', b'"size":' + b"9" * 20),
            "Bad image: block table: 'size' missing or not a non-negative integer",
        ),
    ],
    ids=["deep-entry", "deep-list", "unclosed", "5000-digits", "past-63-bits"],
)
def test_hostile_tables_give_a_clean_image_error(
    start_daemon: Any, table: bytes, expected: str
) -> None:
    d = start_daemon()
    _place(d, "hostile", table)
    error = _load_error(d, "hostile")
    assert error == expected
    assert "recursion" not in error and "digits)" not in error
    assert d.alive()


class Pinger(threading.Thread):
    """A subscribed connection sending ``query-version`` back to back: records, in arrival
    order, each answer ("reply", with its latency) and each ``RAM_BLOCK_ADDED`` event."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.sendall(
            b'{"jsonrpc":"2.0","id":0,"method":"subscribe","params":{"replay":false}}'
        )
        self.buf = b""
        assert "result" in self._next()
        self.stop = threading.Event()
        self.seen: list[str] = []
        self.max_latency = 0.0

    def _next(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            sent = time.monotonic()
            self.sock.sendall(b'{"jsonrpc":"2.0","id":%d,"method":"query-version"}' % n)
            while True:
                msg = self._next()
                if msg.get("method") == "RAM_BLOCK_ADDED":
                    self.seen.append("added")
                    continue
                if msg.get("id") == n:
                    self.max_latency = max(self.max_latency, time.monotonic() - sent)
                    self.seen.append("reply")
                    break

    def finish(self) -> None:
        self.stop.set()
        self.join(30)
        self.sock.close()


def test_a_table_of_360000_blocks_is_refused_without_stalling_other_clients(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    d = start_daemon()
    count = 360_000
    table = _back_to_back([f"b{i}" for i in range(count)])
    assert len(table) > 32 << 20
    _place(d, "many", table, count * ALIGN)
    pinger = Pinger(d.path)
    pinger.start()
    try:
        error = _load_error(d, "many")
    finally:
        pinger.finish()
    assert error == (
        f"Bad image: block table of {len(table)} bytes: longer than 16384 blocks (max-blocks) take"
    )
    assert pinger.seen.count("added") == 0 and pinger.seen.count("reply") > 0
    peak = next(x for x in Path(f"/proc/{d.pid}/status").read_text().splitlines() if "VmHWM" in x)
    with capsys.disabled():
        print(
            f"\n360000-entry table ({len(table) >> 20} MiB): query-version max latency"
            f" {pinger.max_latency * 1000:.1f} ms over {pinger.seen.count('reply')} calls,"
            f" daemon {peak}"
        )


def test_a_table_with_more_entries_than_max_blocks_is_refused_as_the_parse_reaches_them(
    start_daemon: Any,
) -> None:
    d = start_daemon("[limits]\nmax-blocks = 100\n")
    _place(d, "101", _back_to_back([f"b{i}" for i in range(101)]), 101 * ALIGN)
    assert _load_error(d, "101") == "Bad image: block table: more than 100 blocks (max-blocks)"
    _place(d, "100", _back_to_back([f"b{i}" for i in range(100)]), 100 * ALIGN)
    assert _load_error(d, "100") == "Bad image: checksum mismatch in block 'b0'"  # parsed


def test_a_table_of_max_blocks_entries_is_checked_and_refused_in_slices(
    start_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The largest table the default limits read: 16384 entries of about 1 KiB. Its blocks
    are created (invisible) for the verification pass, whose first checksum fails: they are
    aborted. Other clients are answered throughout and see no block."""
    d = start_daemon()
    count = 16384
    pad = "x" * 700
    table = _back_to_back([f"b{i}" for i in range(count)], settings={"pad": pad})
    _place(d, "max", table, count * ALIGN)
    pinger = Pinger(d.path)
    pinger.start()
    try:
        error = _load_error(d, "max")
    finally:
        pinger.finish()
    assert error == "Bad image: checksum mismatch in block 'b0'"
    assert pinger.seen.count("added") == 0 and pinger.seen.count("reply") > 0
    peak = next(x for x in Path(f"/proc/{d.pid}/status").read_text().splitlines() if "VmHWM" in x)
    with capsys.disabled():
        print(
            f"\n{count}-entry table ({len(table) >> 20} MiB): query-version max latency"
            f" {pinger.max_latency * 1000:.1f} ms over {pinger.seen.count('reply')} calls,"
            f" daemon {peak}"
        )


def _batch(r: Raw, method: str, params: list[dict[str, Any]]) -> None:
    """Call ``method`` once per ``params``, in batches of 1000; every call must succeed."""
    for at in range(0, len(params), 1000):
        batch = [
            {"jsonrpc": "2.0", "id": i, "method": method, "params": p}
            for i, p in enumerate(params[at : at + 1000])
        ]
        r.send(json.dumps(batch).encode())
        answers = r.reply()
        assert isinstance(answers, list) and all("result" in a for a in answers), answers


def test_blocks_a_load_creates_are_committed_in_slices_between_other_requests(
    start_daemon: Any,
) -> None:
    d = start_daemon()
    count = 3000
    with Raw(d.path) as r:
        _batch(r, "ram-block-add", [{"id": f"s{i}", "size": ALIGN} for i in range(count)])
        wait_job(r, r.call("ram-save", target={"file": "small"})["job-id"])
        _batch(r, "ram-block-del", [{"id": f"s{i}"} for i in range(count)])
        pinger = Pinger(d.path)
        pinger.start()
        try:
            info = wait_job(r, r.call("ram-load", source={"file": "small"})["job-id"])
            # the job concluded; the pinger reads the last events it was sent
            deadline = time.monotonic() + 60
            while pinger.seen.count("added") < count and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            pinger.finish()
        assert info.get("error") is None, info
        assert len(r.call("query-ram-blocks")) == count
    seen = pinger.seen
    assert seen.count("added") == count
    first, last = seen.index("added"), len(seen) - 1 - seen[::-1].index("added")
    assert "reply" in seen[first:last], "every block was committed in one turn of the loop"
    assert os.path.exists(d.dir / "state" / "small")
