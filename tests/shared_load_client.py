"""One client process of the shared-block load test (tests/test_shared_load.py,
bench/shared_load.py): a seeded random mix of add/resize/del/get-fd/put-fd/write/read/save/
load against a real daemon, mapping every fd it gets ``MAP_SHARED`` and touching its whole
mapped range after every event. Prints one JSON object of counts and latencies on stdout.

    python shared_load_client.py SOCKET INDEX CLIENTS SEED SECONDS [SHARED_IDS]

Run it as a process of its own: if the daemon ever cuts a mapping it was not told of, the
touch takes ``SIGBUS`` and kills this process only; its parent sees the signal as the exit
status.

Connections. A connection answers its requests in order, so the one that maps blocks must
never wait behind a request that itself waits for acknowledgements: ``mapper`` only sends
``ram-block-get-fd``, ``ram-block-put-fd`` and ``ram-block-ack`` (answered at once), and
receives the events of the blocks it maps (no ``subscribe``); ``cmd`` sends everything else.
One thread: every wait for an answer is a ``select`` on both sockets, so events are handled
(and acknowledged) while any answer is awaited. Messages are handled in stream order and
the awaited answer is applied before anything behind it: the events that follow a
``ram-block-get-fd`` answer are those of the block it made this client map.

Ownership of the bytes, so that every verification is exact. A page is cut into slots of
``SLOT`` bytes; client ``INDEX`` owns slot ``INDEX`` (written only through its mappings) and
slot ``CLIENTS + INDEX`` (written only with ``ram-block-write``) of every page of every block.
Shared blocks (``s0``...) are added, resized, deleted, mapped and written by everyone but never
loaded; each client's own blocks (``o<INDEX>x``, ``o<INDEX>y``) are changed, mapped, saved and
loaded by it alone. So:

- a mapping slot changes only by this client's touches, a completed shrink (then zeros when
  grown back) or a rolled-back one (kept), a removal or a load of an own block (any of this
  client's earlier patterns): the events of the mapper connection say which;
- an ``ram-block-write`` / ``ram-block-read`` round trip reads back the pattern written, or
  zeros on a shared block when another client shrank or replaced it in between;
- an own block's write slots are modelled exactly (writes, shrinks, saves, loads) and read back
  whole.
"""

from __future__ import annotations

import array
import base64
import faulthandler
import json
import mmap
import os
import random
import select
import socket
import struct
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: Set RAMD_LOAD_TRACE=DIR to have each client log its requests, answers, events and
#: touches to DIR/client<INDEX>.log (line-buffered, so a SIGBUS loses nothing).
PAGE = 4096
MAX_PAGES = 64
#: No answer for this long: the answer is lost (the client stops and says so).
ANSWER_TIMEOUT = 120.0
#: Error messages that concurrent clients make expected outcomes, by a short name.
EXPECTED = (
    ("is busy", "busy"),
    ("not found", "not found"),
    ("Timed out waiting", "timed out"),
    ("already exists", "exists"),
    ("Size too large", "too large"),
    ("Size mismatch", "mismatch"),
    ("is not shared", "not shared"),
    ("out of bounds", "out of bounds"),
    ("is not mapped by this connection", "not a mapper"),
    ("No acknowledgement of event", "no ack owed"),
    ("Too many jobs", "max-jobs"),
    ("would shrink while", "held"),
)


def slot_size(clients: int) -> int:
    """Bytes per slot: two slots per client in a page, at most 64."""
    return min(64, PAGE // (2 * clients) // 32 * 32)


class Conn:
    """A blocking JSON-RPC connection, read only when ``select`` says so."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.fds: list[int] = []
        self.next_id = 1
        self.outstanding: dict[int, tuple[str, float]] = {}
        self.closed = False
        #: messages read and not yet handled, in stream order
        self.inbox: deque[dict[str, Any]] = deque()

    def send(self, method: str, params: dict[str, Any]) -> int:
        req_id = self.next_id
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "method": method, "params": params, "id": req_id}
        self.outstanding[req_id] = (method, time.monotonic())
        self.sock.sendall(json.dumps(msg).encode())
        return req_id

    def read(self) -> None:
        """Queue the messages completed by one read (fds received go to ``self.fds``)."""
        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 8))
        for level, kind, raw in anc:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % 4])
                self.fds.extend(fds)
        if not data:
            self.closed = True
            return
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        self.inbox.extend(json.loads(line) for line in lines)


@dataclass
class Mapping:
    """This client's mapping of one block; ``expect[page]`` is what its mapping slot must
    hold: a tuple of acceptable values, or None (zeros or any of this client's patterns
    for that page)."""

    fd: int
    size: int
    writable: bool
    mem: mmap.mmap | None = None
    expect: dict[int, tuple[bytes, ...] | None] = field(default_factory=dict)
    cut: dict[int, tuple[bytes, ...] | None] = field(default_factory=dict)

    def map(self, size: int) -> None:
        self.unmap()
        self.size = size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        self.mem = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=prot)

    def unmap(self) -> None:
        if self.mem is not None:
            self.mem.close()
            self.mem = None


@dataclass
class OwnBlock:
    size: int
    max_size: int
    backend: str
    #: page -> this client's write-slot contents (absent: zeros)
    data: dict[int, bytes] = field(default_factory=dict)


class Client:
    def __init__(self, path: str, index: int, clients: int, seed: int, shared_ids: int) -> None:
        self.index = index
        self.slot = slot_size(clients)
        self.map_off = index * self.slot
        self.rpc_off = (clients + index) * self.slot
        self.zero = bytes(self.slot)
        self.rng = random.Random(seed * 1000 + index)
        self.shared = [f"s{i}" for i in range(shared_ids)]
        self.own_ids = [f"o{index}x", f"o{index}y"]
        self.image = f"img{index}"
        self.cmd = Conn(path)
        self.mapper = Conn(path)
        self.maps: dict[str, Mapping] = {}
        #: blocks whose removal was announced: fd and expectations kept until a rollback
        #: (RAM_BLOCK_ADDED) or until the id is mapped again
        self.removed: dict[str, Mapping] = {}
        #: own blocks being loaded: their mapping slots may change behind this client's back
        self.loading: set[str] = set()
        self.own: dict[str, OwnBlock] = {}
        self.snapshot: dict[str, OwnBlock] | None = None
        self.counter = 0
        self.answers: dict[int, dict[str, Any]] = {}
        self.ops: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {}
        self.counts = dict.fromkeys(
            (
                "sent",
                "answered",
                "lost",
                "internal",
                "unexpected",
                "mismatch",
                "disconnected",
                "events",
                "acks",
                "touches",
                "pages touched",
                "rollbacks seen",
                "reset reads",
                "stray fds",
            ),
            0,
        )
        self.unexpected: list[str] = []
        trace_dir = os.environ.get("RAMD_LOAD_TRACE")
        self.trace_file = (
            open(f"{trace_dir}/client{index}.log", "w", buffering=1)  # noqa: SIM115
            if trace_dir
            else None
        )

    def trace(self, *what: object) -> None:
        if self.trace_file is not None:
            print(f"{time.monotonic():.4f}", *what, file=self.trace_file)

    # -- patterns ------------------------------------------------------------------------

    def pattern(self, tag: bytes, block: str, page: int) -> bytes:
        self.counter += 1
        return self._pattern(tag, block, page, self.counter)

    def _pattern(self, tag: bytes, block: str, page: int, counter: int) -> bytes:
        head = tag + struct.pack("<HIIQ", self.index, page, zlib.crc32(block.encode()), counter)
        return (head + bytes([counter & 0xFF]) * self.slot)[: self.slot]

    def well_formed(self, tag: bytes, block: str, page: int, value: bytes) -> bool:
        """``value`` is zeros or one of this client's patterns for that slot."""
        if value == self.zero:
            return True
        counter = struct.unpack_from("<Q", value, 1 + 10)[0]
        return value == self._pattern(tag, block, page, counter)

    # -- wire ----------------------------------------------------------------------------

    def pump(self, timeout: float, awaited: tuple[Conn, int] | None = None) -> None:
        """Handle what has arrived, reading what arrives within ``timeout`` seconds if
        nothing was queued: answers are stored, events handled, in stream order. Stops
        right after the ``awaited`` answer: the messages behind it (events of a block its
        ``ram-block-get-fd`` just made this client map) wait until the caller applied it."""
        if self._dispatch(awaited):
            return
        conns = [c for c in (self.cmd, self.mapper) if not c.closed]
        if not conns:
            raise ConnectionError("both connections closed")
        ready, _, _ = select.select([c.sock for c in conns], [], [], timeout)
        for conn in conns:
            if conn.sock in ready:
                conn.read()
                if conn.closed:
                    self.counts["disconnected"] += 1
        self._dispatch(awaited)

    def _dispatch(self, awaited: tuple[Conn, int] | None) -> bool:
        """Handle the queued messages; True once the ``awaited`` answer was stored."""
        for conn in (self.cmd, self.mapper):
            while conn.inbox:
                msg = conn.inbox.popleft()
                if "id" not in msg and "method" in msg:
                    if conn is not self.mapper:
                        self.note_unexpected(f"event on the command connection: {msg}")
                    self.event(msg["method"], msg["params"]["data"])
                    continue
                req_id = msg.get("id")
                if req_id not in conn.outstanding:
                    self.note_unexpected(f"answer to no request: {msg}")
                    continue
                method, t0 = conn.outstanding.pop(req_id)
                self.latency.setdefault(method, []).append(time.monotonic() - t0)
                self.counts["answered"] += 1
                if method == "ram-block-ack":  # nobody waits for these
                    self.classify(method, msg)
                    continue
                self.answers[req_id] = msg
                if awaited == (conn, req_id):
                    return True
        return False

    def call(self, conn: Conn, method: str, **params: Any) -> dict[str, Any]:
        """Send one request and wait for its answer, handling events meanwhile; the answer,
        its error (if any) classified and counted under ``method``."""
        self.counts["sent"] += 1
        req_id = conn.send(method, params)
        self.trace("send", "cmd" if conn is self.cmd else "mapper", req_id, method, params)
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while req_id not in self.answers:
            if conn.closed or time.monotonic() > deadline:
                raise LostAnswer(method)
            self.pump(1.0, (conn, req_id))
        resp = self.answers.pop(req_id)
        self.trace("answer", req_id, resp)
        self.classify(method, resp)
        return resp

    def classify(self, method: str, resp: dict[str, Any]) -> None:
        if "error" not in resp:
            outcome = "ok"
        else:
            err = resp["error"]
            if err.get("code") == -32603:
                self.counts["internal"] += 1
                outcome = "internal error"
            else:
                msg = err.get("message", "")
                outcome = next((name for key, name in EXPECTED if key in msg), "")
                if not outcome:
                    self.note_unexpected(f"{method}: {msg}")
                    outcome = "unexpected"
        key = f"{method} {outcome}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def note_unexpected(self, what: str) -> None:
        self.counts["unexpected"] += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(what)

    def mismatch(self, what: str) -> None:
        self.counts["mismatch"] += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(f"mismatch: {what}")

    # -- events and touches --------------------------------------------------------------

    def event(self, name: str, data: dict[str, Any]) -> None:
        """A block event on the mapper connection: follow it, acknowledge it if asked, then
        touch everything mapped."""
        self.counts["events"] += 1
        self.trace("event", name, data)
        block = data.get("id", "")
        m = self.maps.get(block)
        if name == "RAM_BLOCK_RESIZED" and m is not None:
            old, new = data["old-size"], data["new-size"]
            if new < old:
                for page in range(new // PAGE, old // PAGE):
                    m.cut[page] = m.expect.pop(page, None)
            else:
                for page in range(old // PAGE, new // PAGE):
                    before = m.cut.pop(page, None)
                    m.expect[page] = None if before is None else (self.zero, *before)
            m.map(new)
        elif name == "RAM_BLOCK_REMOVED" and m is not None:
            m.unmap()
            del self.maps[block]
            self.forget_removed(block)
            self.removed[block] = m
        elif name == "RAM_BLOCK_ADDED" and block in self.removed:
            m = self.removed.pop(block)
            m.map(data["size"])
            self.maps[block] = m
            self.counts["rollbacks seen"] += 1
        if data.get("ack"):
            self.counts["acks"] += 1
            self.counts["sent"] += 1
            self.mapper.send("ram-block-ack", {"seq": data["seq"]})
        self.touch()

    def touch(self) -> None:
        """Check this client's mapping slot in every page mapped, then write a new pattern
        into it (writable mappings); never outside ``[0, size)`` of the last event."""
        self.counts["touches"] += 1
        for block, m in self.maps.items():
            self.trace("touch", block, m.size, os.fstat(m.fd).st_size)
            mem = m.mem
            if mem is None:
                raise RuntimeError(f"{block} is in the mapped set without a mapping")
            for page in range(m.size // PAGE):
                off = page * PAGE + self.map_off
                got = mem[off : off + self.slot]
                want = m.expect.get(page)
                if want is None or block in self.loading:
                    ok = self.well_formed(b"M", block, page, got)
                else:
                    ok = got in want
                if not ok:
                    self.mismatch(f"mapping {block} page {page}: {got[:20]!r} not in {want!r}")
                if m.writable:
                    value = self.pattern(b"M", block, page)
                    mem[off : off + self.slot] = value
                    m.expect[page] = (value,)
                else:
                    m.expect[page] = (got,)
            self.counts["pages touched"] += m.size // PAGE

    def forget_removed(self, block: str) -> None:
        m = self.removed.pop(block, None)
        if m is not None:
            os.close(m.fd)

    # -- operations ----------------------------------------------------------------------

    def any_id(self) -> str:
        return self.rng.choice(self.shared + self.own_ids)

    def op_add(self) -> None:
        own = self.rng.random() < 0.3
        block = self.rng.choice(self.own_ids if own else self.shared)
        backend = self.rng.choice(["memfd", "memfd", "file", "anonymous"])
        pages = self.rng.randint(1, 16)
        params: dict[str, Any] = {"id": block, "size": pages * PAGE, "backend": backend}
        if self.rng.random() < 0.8:
            params["max-size"] = self.rng.randint(pages, MAX_PAGES) * PAGE
        resp = self.call(self.cmd, "ram-block-add", **params)
        if own and "result" in resp:
            r = resp["result"]
            self.own[block] = OwnBlock(r["size"], r["max-size"], r["backend"])

    def op_resize(self) -> None:
        block = self.any_id()
        size = self.rng.randint(1, MAX_PAGES) * PAGE
        mode = "hard" if self.rng.random() < 0.2 else "safe"
        resp = self.call(self.cmd, "ram-block-resize", id=block, size=size, mode=mode)
        own = self.own.get(block)
        if own is not None and "result" in resp:
            for page in [p for p in own.data if p * PAGE >= resp["result"]["size"]]:
                del own.data[page]
            own.size = resp["result"]["size"]

    def op_del(self) -> None:
        block = self.any_id()
        mode = "hard" if self.rng.random() < 0.2 else "safe"
        resp = self.call(self.cmd, "ram-block-del", id=block, mode=mode)
        if "result" in resp:
            self.own.pop(block, None)

    def op_get_fd(self) -> None:
        block = self.any_id()
        readonly = self.rng.random() < 0.25
        resp = self.call(self.mapper, "ram-block-get-fd", id=block, readonly=readonly)
        if "result" not in resp:
            if self.mapper.fds:
                self.counts["stray fds"] += 1
            return
        if len(self.mapper.fds) != 1:
            self.note_unexpected(f"get-fd answered with {len(self.mapper.fds)} fds")
            return
        fd = self.mapper.fds.pop()
        size = resp["result"]["size"]
        if os.fstat(fd).st_size < size:
            self.note_unexpected(f"fd of {block} shorter than {size}")
        if block in self.maps:  # already mapped: the daemon keeps one holding
            os.close(fd)
            return
        self.forget_removed(block)
        m = Mapping(fd, size, writable=not readonly)
        m.map(size)
        self.maps[block] = m
        self.touch()

    def op_put_fd(self) -> None:
        if not self.maps:
            return
        block = self.rng.choice(sorted(self.maps))
        m = self.maps.pop(block)
        m.unmap()
        os.close(m.fd)
        self.call(self.mapper, "ram-block-put-fd", id=block)

    def op_write_read(self) -> None:
        block = self.any_id()
        page = self.rng.randrange(MAX_PAGES)
        value = self.pattern(b"R", block, page)
        offset = page * PAGE + self.rpc_off
        data = base64.b64encode(value).decode()
        resp = self.call(self.cmd, "ram-block-write", id=block, offset=offset, data=data)
        own = self.own.get(block)
        if "result" not in resp:
            return
        if own is not None:
            own.data[page] = value
        back = self.call(self.cmd, "ram-block-read", id=block, offset=offset, length=self.slot)
        if "result" not in back:
            return
        got = base64.b64decode(back["result"]["data"])
        if got == value:
            return
        if got == self.zero and block in self.shared:
            self.counts["reset reads"] += 1
            return
        self.mismatch(f"read back {block} page {page}: {got[:20]!r} != {value[:20]!r}")

    def op_verify_own(self) -> None:
        """Read an own block whole and compare its write slots with the model."""
        if not self.own:
            return
        block = self.rng.choice(sorted(self.own))
        own = self.own[block]
        resp = self.call(self.cmd, "ram-block-read", id=block, offset=0, length=own.size)
        if "result" not in resp:
            self.mismatch(f"own block {block} unreadable: {resp['error']}")
            return
        data = base64.b64decode(resp["result"]["data"])
        for page in range(own.size // PAGE):
            off = page * PAGE + self.rpc_off
            got = data[off : off + self.slot]
            want = own.data.get(page, self.zero)
            if got != want:
                self.mismatch(f"own {block} page {page}: {got[:20]!r} != {want[:20]!r}")

    def wait_job(self, job_id: str) -> dict[str, Any]:
        while True:
            jobs = self.call(self.cmd, "query-jobs").get("result", [])
            job = next((j for j in jobs if j["id"] == job_id), None)
            if job is None:
                self.note_unexpected(f"job {job_id} vanished")
                return {"error": "vanished"}
            if job["status"] == "concluded":
                self.call(self.cmd, "job-dismiss", id=job_id)
                return job  # type: ignore[no-any-return]
            self.pump(0.02)

    def op_save(self) -> None:
        blocks = sorted(self.own)
        if not blocks:
            return
        resp = self.call(self.cmd, "ram-save", target={"file": self.image}, blocks=blocks)
        if "result" not in resp:
            return
        job = self.wait_job(resp["result"]["job-id"])
        self.job_outcome("ram-save", job)
        if "error" not in job:
            self.snapshot = {
                b: OwnBlock(o.size, o.max_size, o.backend, dict(o.data))
                for b, o in self.own.items()
            }

    def op_load(self) -> None:
        if self.snapshot is None:
            return
        resp = self.call(self.cmd, "ram-load", source={"file": self.image})
        if "result" not in resp:
            return
        self.loading = set(self.snapshot)
        job = self.wait_job(resp["result"]["job-id"])
        self.job_outcome("ram-load", job)
        listed = {b["id"]: b for b in self.call(self.cmd, "query-ram-blocks").get("result", [])}
        if "error" not in job:
            for block, snap in self.snapshot.items():
                info = listed.get(block)
                if info is None:
                    self.mismatch(f"{block} missing after a load")
                    self.own.pop(block, None)
                    continue
                self.own[block] = OwnBlock(
                    info["size"], info["max-size"], info["backend"], dict(snap.data)
                )
                if info["size"] != snap.size:
                    self.mismatch(f"{block} size {info['size']} after a load of {snap.size}")
        for block in self.own:
            if block in listed and listed[block]["size"] != self.own[block].size:
                self.mismatch(f"{block} size {listed[block]['size']} != {self.own[block].size}")
        self.touch()  # the first touch after the load accepts what the image held
        self.loading = set()

    def job_outcome(self, kind: str, job: dict[str, Any]) -> None:
        err = job.get("error")
        if err is None:
            outcome = "ok"
        else:
            outcome = next((name for key, name in EXPECTED if key in err), "")
            if not outcome:
                self.note_unexpected(f"{kind} job: {err}")
                outcome = "unexpected"
        key = f"{kind} job {outcome}"
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    OPS = (
        ("add", 3),
        ("resize", 4),
        ("del", 2),
        ("get_fd", 4),
        ("put_fd", 2),
        ("write_read", 4),
        ("verify_own", 1),
        ("save", 1),
        ("load", 1),
    )

    def run(self, seconds: float) -> None:
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            name = self.rng.choices(names, weights)[0]
            getattr(self, f"op_{name}")()
            self.ops[name] = self.ops.get(name, 0) + 1
            self.pump(0)
            self.touch()

    def finish(self) -> None:
        """Wait for every answer still owed (acknowledgements), then close."""
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while any(c.outstanding and not c.closed for c in (self.cmd, self.mapper)):
            if time.monotonic() > deadline:
                break
            self.pump(1.0)
        for c in (self.cmd, self.mapper):
            self.counts["lost"] += len(c.outstanding)
            c.sock.close()
        for m in list(self.maps.values()) + list(self.removed.values()):
            m.unmap()
            os.close(m.fd)

    def report(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "counts": self.counts,
            "ops": self.ops,
            "outcomes": self.outcomes,
            "latency": self.latency,
            "unexpected": self.unexpected,
        }


class LostAnswer(Exception):
    pass


def main(argv: list[str]) -> int:
    path, index, clients, seed, seconds = argv[:5]
    shared_ids = int(argv[5]) if len(argv) > 5 else 6
    faulthandler.enable()
    client = Client(path, int(index), int(clients), int(seed), shared_ids)
    try:
        client.run(float(seconds))
    except (LostAnswer, ConnectionError) as e:
        client.note_unexpected(f"stopped: {e!r}")
    client.finish()
    json.dump(client.report(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
