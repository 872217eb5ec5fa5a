"""Stress run of a real ramd: many clients, subscribers, and slow subscribers at once.

Usage: ``python bench/stress.py [--clients 32] [--seconds 20] [--subscribers 2]
[--stopped 2] [--stalled 2] [--qmp-every 4] [--queue 1024] [--seed 1]``

Starts ``python -m ramd`` with both sockets in a temporary directory, then for ``--seconds``:

* ``--clients`` client threads (every ``--qmp-every``-th one on QMP, the rest JSON-RPC) run a
  random workload: add / resize / del / read / write / discard on their own blocks (contents
  modelled and verified at the end), on a few shared blocks (refusals are expected there) and
  a few deliberately invalid requests (unknown command, bad arguments);
* ``--subscribers`` JSON-RPC subscribers count the events they receive and check ``seq``;
* ``--stopped`` subscriber *processes* are SIGSTOPped right after subscribing, and
  ``--stalled`` subscriber sockets never read: the daemon must drop all of them (its log says
  "disconnecting slow subscriber") without slowing anyone else.

Prints one table: requests served, errors by class, events emitted and delivered, slow
subscribers dropped, daemon RSS (peak ``VmHWM`` and the highest ``VmRSS`` sampled), fds at
start and end, contents lost, and the daemon's exit status. Exits 1 if anything went wrong
(internal error, lost write, seq gap, a hung client, a crash).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

PAGE = 4096
SHARED = ["shared0", "shared1", "shared2", "shared3"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- daemon ------------------------------------------------------------------------------------


class Daemon:
    """``python -m ramd`` with both sockets, in its own directory."""

    def __init__(self, workdir: Path, queue: int) -> None:
        self.path = workdir / "ramd.sock"
        self.qmp_path = workdir / "qmp.sock"
        self.log = workdir / "ramd.log"
        config = workdir / "ramd.toml"
        config.write_text(f"[limits]\nsubscriber-queue = {queue}\nmax-connections = 1024\n")
        cmd = [sys.executable, "-m", "ramd", "--socket", str(self.path)]
        cmd += ["--qmp-socket", str(self.qmp_path), "--config", str(config)]
        cmd += ["--log-level", "info"]
        self._logf = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"ramd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("ramd did not start") from None
                time.sleep(0.02)

    def status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._logf.close()
        return self.proc.returncode


# -- clients -----------------------------------------------------------------------------------


class Conn:
    """A blocking connection of either dialect; events are counted, not kept."""

    def __init__(self, path: Path, qmp: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.buf = bytearray()
        self.qmp = qmp
        self.next_id = 1
        self.events = 0
        if qmp:
            self.line()  # greeting
            assert "return" in self.request("qmp_capabilities", None)

    def line(self) -> Any:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                raw = bytes(self.buf[:i])
                del self.buf[: i + 1]
                return json.loads(raw)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk

    def request(self, name: str, args: Any) -> dict[str, Any]:
        req_id = self.next_id
        self.next_id += 1
        if self.qmp:
            req: dict[str, Any] = {"execute": name, "id": req_id}
            if args is not None:
                req["arguments"] = args
        else:
            req = {"jsonrpc": "2.0", "method": name, "id": req_id}
            if args is not None:
                req["params"] = args
        self.sock.sendall(json.dumps(req).encode())
        while True:
            msg = self.line()
            if "event" in msg or ("method" in msg and "id" not in msg):
                self.events += 1
                continue
            assert msg.get("id") == req_id, (req_id, msg)
            return msg  # type: ignore[no-any-return]

    def outcome(self, name: str, args: Any) -> tuple[str, Any]:
        """``("ok", result)`` or (error class or ``-326xx`` code, message)."""
        resp = self.request(name, args)
        if "result" in resp or "return" in resp:
            return "ok", resp.get("result", resp.get("return"))
        err = resp["error"]
        if self.qmp:
            kind = "internal" if err["desc"] == "Internal error" else err["class"]
            return kind, err["desc"]
        if err["code"] == -32000:
            return err["data"]["class"], err["message"]
        return str(err["code"]), err["message"]

    def close(self) -> None:
        self.sock.close()


class Client:
    """One worker: own blocks (modelled), shared blocks, a few invalid requests."""

    def __init__(self, d: Daemon, index: int, qmp: bool, seed: int, stop_at: float) -> None:
        self.conn = Conn(d.qmp_path if qmp else d.path, qmp)
        self.index = index
        self.rng = random.Random(seed * 1000 + index)
        self.stop_at = stop_at
        self.own: dict[str, bytearray] = {}
        self.outcomes: Counter[str] = Counter()
        self.lost = 0
        self.failure: str | None = None

    def call(self, name: str, args: Any) -> Any:
        kind, value = self.conn.outcome(name, args)
        self.outcomes[kind] += 1
        if kind != "ok":
            raise AssertionError(f"own block: {name} {args}: {kind} {value}")
        return value

    def run(self) -> None:
        try:
            while time.monotonic() < self.stop_at:
                r = self.rng.random()
                if r < 0.6:
                    self.own_op()
                elif r < 0.98:
                    self.shared_op()
                else:
                    self.invalid_op()
            for block_id, data in self.own.items():
                got = self.call(
                    "ram-block-read", {"id": block_id, "offset": 0, "length": len(data)}
                )
                if base64.b64decode(got["data"]) != data:
                    self.lost += 1
        except Exception as e:
            self.failure = f"client {self.index}: {e!r}"
        finally:
            self.conn.close()

    def own_op(self) -> None:
        rng = self.rng
        block_id = f"c{self.index}-{rng.randrange(4)}"
        data = self.own.get(block_id)
        if data is None:
            size = rng.randint(1, 8) * PAGE
            self.call("ram-block-add", {"id": block_id, "size": size, "max-size": 64 * PAGE})
            self.own[block_id] = bytearray(size)
            return
        op = rng.choice(["resize", "write", "write", "read", "discard", "del"])
        if op == "resize":
            size = rng.randint(1, 64) * PAGE
            self.call("ram-block-resize", {"id": block_id, "size": size})
            data[size:] = b""
            data += bytes(size - len(data))
        elif op == "write":
            offset = rng.randrange(len(data))
            chunk = rng.randbytes(rng.randint(0, min(2000, len(data) - offset)))
            self.call("ram-block-write", {"id": block_id, "offset": offset, "data": b64(chunk)})
            data[offset : offset + len(chunk)] = chunk
        elif op == "read":
            offset = rng.randrange(len(data))
            length = rng.randint(0, len(data) - offset)
            got = self.call("ram-block-read", {"id": block_id, "offset": offset, "length": length})
            if base64.b64decode(got["data"]) != data[offset : offset + length]:
                self.lost += 1
        elif op == "discard":
            pages = len(data) // PAGE
            first = rng.randrange(pages)
            n = rng.randint(0, pages - first)
            args = {"id": block_id, "offset": first * PAGE, "length": n * PAGE}
            self.call("ram-block-discard", args)
            data[first * PAGE : (first + n) * PAGE] = bytes(n * PAGE)
        else:
            self.call("ram-block-del", {"id": block_id})
            del self.own[block_id]

    def shared_op(self) -> None:
        rng = self.rng
        block_id = rng.choice(SHARED)
        op = rng.choice(["add", "resize", "resize", "del", "read", "write", "discard", "query"])
        offset = rng.randrange(8) * PAGE
        if op == "add":
            args = {"id": block_id, "size": rng.randint(1, 16) * PAGE, "max-size": 64 * PAGE}
            name = "ram-block-add"
        elif op == "resize":
            args = {"id": block_id, "size": rng.randint(1, 64) * PAGE}
            name = "ram-block-resize"
        elif op == "del":
            args, name = {"id": block_id}, "ram-block-del"
        elif op == "read":
            args, name = {"id": block_id, "offset": offset, "length": PAGE}, "ram-block-read"
        elif op == "write":
            args = {"id": block_id, "offset": offset, "data": b64(b"s" * 512)}
            name = "ram-block-write"
        elif op == "discard":
            args, name = {"id": block_id, "offset": offset, "length": PAGE}, "ram-block-discard"
        else:
            args, name = {"id": block_id}, "query-ram-blocks"
        self.outcomes[self.conn.outcome(name, args)[0]] += 1

    def invalid_op(self) -> None:
        name, args = self.rng.choice(
            [
                ("no-such-command", None),
                ("ram-block-add", {"id": "0bad", "size": PAGE}),
                ("ram-block-resize", {"id": "x", "size": 0}),
                ("ram-block-read", {"id": "x", "offset": -1, "length": 1}),
            ]
        )
        self.outcomes[self.conn.outcome(name, args)[0]] += 1


class Subscriber:
    """A JSON-RPC subscriber that keeps up: counts events and checks ``seq`` has no gap."""

    def __init__(self, d: Daemon) -> None:
        self.conn = Conn(d.path, qmp=False)
        self.first = self.conn.request("subscribe", {"replay": False})["result"]["seq"]
        self.last = self.first
        self.received = 0
        self.gaps = 0
        self.done = threading.Event()
        self.failure: str | None = None

    def run(self) -> None:
        try:
            self.conn.sock.settimeout(0.2)
            while not self.done.is_set():
                try:
                    msg = self.conn.line()
                except TimeoutError:
                    continue
                self.count(msg)
            self.conn.sock.settimeout(60)
            self.conn.sock.sendall(b'{"jsonrpc":"2.0","method":"query-version","id":"end"}')
            while (msg := self.conn.line()).get("id") != "end":
                self.count(msg)
        except Exception as e:
            self.failure = f"subscriber: {e!r}"
        finally:
            self.conn.close()

    def count(self, msg: dict[str, Any]) -> None:
        seq = msg["params"]["data"]["seq"]
        self.gaps += seq != self.last + 1
        self.last = seq
        self.received += 1


STOPPED_SUBSCRIBER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b'{"jsonrpc":"2.0","method":"subscribe","params":{"replay":false},"id":1}')
    buf = b""
    while b"\\n" not in buf:
        buf += s.recv(65536)
    print("subscribed", flush=True)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    """
)


def sampler(d: Daemon, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], d.status("VmRSS"))
        except (OSError, KeyError):
            return
        stop.wait(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--subscribers", type=int, default=2)
    ap.add_argument("--stopped", type=int, default=2, help="SIGSTOPped subscriber processes")
    ap.add_argument("--stalled", type=int, default=2, help="subscriber sockets never read")
    ap.add_argument("--qmp-every", type=int, default=4, help="every Nth client speaks QMP")
    ap.add_argument("--queue", type=int, default=1024, help="the daemon's subscriber-queue")
    ap.add_argument("--seed", type=int, default=1)
    opts = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ramd-stress-"))
    d = Daemon(workdir, opts.queue)
    problems: list[str] = []
    time.sleep(0.2)  # let the start-up probe connection close
    fds_start, rss_start = d.fds(), d.status("VmRSS")
    first_seq = _stats(d)["events-emitted"]

    subscribers = [Subscriber(d) for _ in range(opts.subscribers)]
    stopped = []
    for _ in range(opts.stopped):
        proc = subprocess.Popen(
            [sys.executable, "-c", STOPPED_SUBSCRIBER, str(d.path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "subscribed"
        os.kill(proc.pid, signal.SIGSTOP)
        stopped.append(proc)
    stalled = []
    for _ in range(opts.stalled):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(d.path))
        sock.sendall(b'{"jsonrpc":"2.0","method":"subscribe","params":{"replay":false},"id":1}')
        stalled.append(sock)

    stop_sampling, peak = threading.Event(), [rss_start]
    threading.Thread(target=sampler, args=(d, stop_sampling, peak), daemon=True).start()
    start = time.monotonic()
    stop_at = start + opts.seconds
    every = max(opts.qmp_every, 1)
    clients = [
        Client(d, i, opts.qmp_every > 0 and i % every == every - 1, opts.seed, stop_at)
        for i in range(opts.clients)
    ]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    threads += [threading.Thread(target=s.run, daemon=True) for s in subscribers]
    for t in threads:
        t.start()
    for t in threads[: len(clients)]:
        t.join(opts.seconds + 300)
    elapsed = time.monotonic() - start
    for s in subscribers:
        s.done.set()
    for t in threads[len(clients) :]:
        t.join(120)
    if any(t.is_alive() for t in threads):
        problems.append("a client or subscriber hung")

    stats = _stats(d)
    emitted = stats["events-emitted"] - first_seq
    for proc in stopped:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
    for sock in stalled:
        sock.close()
    stop_sampling.set()
    # Closes are asynchronous: give the daemon a moment to release the clients' fds.
    deadline = time.monotonic() + 10
    while d.fds() > fds_start and time.monotonic() < deadline:
        time.sleep(0.05)
    fds_end = d.fds()
    hwm, rss_end = d.status("VmHWM"), d.status("VmRSS")
    peak[0] = max(peak[0], rss_end)
    exit_code = d.stop()
    log = d.log.read_text(errors="replace")

    outcomes: Counter[str] = Counter()
    for c in clients:
        outcomes.update(c.outcomes)
        if c.failure:
            problems.append(c.failure)
    for s in subscribers:
        if s.failure:
            problems.append(s.failure)
    lost = sum(c.lost for c in clients)
    gaps = sum(s.gaps for s in subscribers)
    served = sum(outcomes.values())
    delivered = sum(s.received for s in subscribers)
    qmp_delivered = sum(c.conn.events for c in clients if c.conn.qmp)
    dropped = log.count("disconnecting slow subscriber")
    internal = outcomes["internal"] + outcomes["-32603"] + log.count("Traceback")
    expected_drops = opts.stopped + opts.stalled
    if internal:
        problems.append(f"{internal} internal errors")
    if lost:
        problems.append(f"{lost} reads did not return the bytes written")
    if gaps or any(s.last != stats["events-emitted"] for s in subscribers):
        problems.append("a subscriber missed events (seq gap)")
    if dropped < expected_drops:
        problems.append(f"only {dropped} of {expected_drops} slow subscribers were dropped")
    if fds_end > fds_start:
        problems.append(f"fds: {fds_end} at the end, {fds_start} at the start")
    if exit_code != 0:
        problems.append(f"ramd exited {exit_code}")

    n_qmp = sum(1 for c in clients if c.conn.qmp)
    rows: list[tuple[str, str]] = [
        ("clients (JSON-RPC + QMP) x seconds", f"{opts.clients - n_qmp} + {n_qmp} x {elapsed:.1f}"),
        ("requests served", f"{served:,} ({served / elapsed:,.0f}/s)"),
        ("  ok", f"{outcomes['ok']:,}"),
    ]
    for kind, n in sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        if kind != "ok":
            label = f"JSON-RPC {kind}" if kind.startswith("-") else kind
            rows.append((f"  error {label}", f"{n:,}"))
    rows += [
        ("internal errors (-32603, tracebacks)", f"{internal}"),
        ("events emitted (query-stats events-emitted)", f"{emitted:,}"),
        (
            f"events delivered to {len(subscribers)} live subscribers",
            f"{delivered:,} (each {', '.join(str(s.received) for s in subscribers)})",
        ),
        (f"events delivered to {n_qmp} QMP sessions", f"{qmp_delivered:,}"),
        ("seq gaps seen by subscribers", f"{gaps}"),
        (
            "slow subscribers disconnected (log)",
            f"{dropped} (of {opts.stopped} SIGSTOPped + {opts.stalled} never-read)",
        ),
        ("contents lost (own blocks, read-back)", f"{lost}"),
        ("blocks at the end", f"{stats['blocks']}"),
        ("daemon RSS: start / max sampled / VmHWM", _mib(rss_start, peak[0], hwm)),
        ("daemon fds: start / end", f"{fds_start} / {fds_end}"),
        ("daemon exit status (SIGTERM)", f"{exit_code}"),
    ]
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    print(f"| {'measure':<{width}} | {'value':<{vwidth}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (vwidth + 2)}|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v:<{vwidth}} |")
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        print(f"daemon log: {d.log}")
        return 1
    for p in workdir.iterdir():
        p.unlink()
    workdir.rmdir()
    return 0


def _stats(d: Daemon) -> dict[str, Any]:
    conn = Conn(d.path, qmp=False)
    try:
        return conn.request("query-stats", None)["result"]  # type: ignore[no-any-return]
    finally:
        conn.close()


def _mib(*values: int) -> str:
    return " / ".join(f"{v / 2**20:.1f}" for v in values) + " MiB"


if __name__ == "__main__":
    sys.exit(main())
