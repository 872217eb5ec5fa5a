"""``docs/protocol.md`` is the daemon's own wire reference, and stays true to the code.

- It names every command that ``query-commands`` lists in the §5 table, and every event of the
  schema in the §6 table, so a command or event added without documenting it fails here.
- Its sections keep the contract's numbers (§1 to §15), and every citation of it elsewhere in
  the repository reads ``docs/protocol.md §N`` with N one of them.
- Every ``text replay`` block is replayed against a fresh daemon started with the
  ``ack-timeout`` its info string names: ``X> JSON`` is sent on connection X (opened when first
  named), ``X< JSON`` must match the next message connection X receives (``...`` stands for any
  text, as in tests/test_readme.py) and must come without an fd, ``X<fd JSON`` must come with
  exactly one (``SCM_RIGHTS``), which is the block's memfd of the answer's ``size``. After the
  last line, each connection's next message must be the answer to one more request: nothing the
  transcript does not show was sent.
"""

from __future__ import annotations

import array
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

from daemon import Daemon, Raw
from test_readme import shown

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"
REPLAY_RE = re.compile(r"^```text replay ack-timeout=(\d+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
STEP_RE = re.compile(r"^([A-Z])(>|<|<fd) (.*)$")
#: Citations of the protocol anywhere in the repository: ``docs/protocol.md §8, §12``.
CITATION_RE = re.compile(r"(\S*)protocol(?:\.md)? ((?:§\d+(?:, | and )?)+)")
#: Files that may cite the protocol (sources, docs, units, schemas, tests).
CITING = {".py", ".md", ".json", ".service", ".socket", ".toml", ".c", ".1", ".8", ""}
SKIP_DIRS = {".git", ".venv", ".ci-venv", "build", "__pycache__", ".mypy_cache", ".ruff_cache"}


def section(number: int) -> str:
    """The text of section ``number`` of the document (up to the next ``## `` heading)."""
    text = DOC.read_text()
    start = re.search(rf"^## {number}\. .*$", text, re.MULTILINE)
    assert start is not None, f"no section {number}"
    end = text.find("\n## ", start.end())
    return text[start.end() : end if end >= 0 else len(text)]


def table_names(text: str) -> set[str]:
    """The names in the first column of the tables of ``text``."""
    return set(re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_-]*)` \|", text, re.MULTILINE))


def test_doc_names_every_command_and_event(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    with Raw(d.path) as r:
        commands = [c["name"] for c in r.call("query-commands")]
        events = set(r.call("query-schema")["events"])
    assert len(commands) >= 30 and len(events) >= 6
    schema = json.loads((ROOT / "schemas" / "ramd.schema.json").read_text())
    assert events == set(schema["events"])
    missing = [name for name in commands if name not in table_names(section(5))]
    assert not missing, f"commands not in the table of docs/protocol.md §5: {missing}"
    missing = sorted(events - table_names(section(6)))
    assert not missing, f"events not in the table of docs/protocol.md §6: {missing}"


def test_doc_keeps_the_contract_section_numbers() -> None:
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. ", DOC.read_text(), re.MULTILINE)]
    assert numbers == list(range(1, 16))


def citing_files() -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [n for n in dirnames if n not in SKIP_DIRS and not n.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath, name)
            if path.suffix in CITING and path != DOC:
                found.append(path)
    return found


def test_every_citation_of_the_protocol_points_at_docs() -> None:
    wrong = []
    cited = 0
    for path in citing_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for match in CITATION_RE.finditer(text):
            cited += 1
            numbers = [int(n) for n in re.findall(r"§(\d+)", match.group(2))]
            where = f"{path.relative_to(ROOT)}: {match.group(0)!r}"
            if not match.group(1).endswith("docs/") or not all(1 <= n <= 15 for n in numbers):
                wrong.append(where)
    assert cited >= 50  # the pattern still finds the citations
    assert not wrong, "cite docs/protocol.md §N (1-15):\n" + "\n".join(wrong)


class Peer:
    """One connection of a transcript: messages with the fds that came with each."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.buf = b""
        self.start = 0  # stream offset of buf[0]
        self.fds: list[tuple[int, int]] = []  # (stream offset of the byte it came with, fd)
        self.next_id = 1000

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def message(self) -> tuple[str, list[int]]:
        """The next message and its fds. The daemon sends an fd with the first byte of its
        message, and a read returns nothing after a byte that carried fds: so each fd came
        with the last byte of its read."""
        while b"\n" not in self.buf:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
            assert data, "the daemon closed the connection"
            end = self.start + len(self.buf) + len(data) - 1
            for level, kind, payload in ancillary:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                self.fds += [(end, fd) for fd in received]
            self.buf += data
        line, rest = self.buf.split(b"\n", 1)
        first, past = self.start, self.start + len(line) + 1
        mine = [fd for at, fd in self.fds if first <= at < past]
        self.fds = [(at, fd) for at, fd in self.fds if at >= past]
        self.buf, self.start = rest, past
        return line.decode(), mine

    def close(self) -> None:
        for _, fd in self.fds:
            os.close(fd)
        self.sock.close()


def replay(d: Daemon, block: str) -> int:
    """Replay one transcript; the number of steps it had."""
    peers: dict[str, Peer] = {}
    steps = 0
    try:
        for number, line in enumerate(block.splitlines(), 1):
            if line.startswith("#") or not line.strip():
                continue
            step = STEP_RE.match(line)
            assert step is not None, f"line {number}: not a step: {line!r}"
            name, kind, text = step.groups()
            peer = peers.get(name) or peers.setdefault(name, Peer(d.path))
            steps += 1
            if kind == ">":
                peer.send(text)
                continue
            got, fds = peer.message()
            try:
                assert shown(text).fullmatch(got), f"line {number}: shown\n{text}\ngot\n{got}"
                assert len(fds) == (1 if kind == "<fd" else 0), f"line {number}: {len(fds)} fds"
                if fds:
                    size = json.loads(got)["result"]["size"]
                    assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("/memfd:")
                    assert os.fstat(fds[0]).st_size == size
            finally:
                for fd in fds:
                    os.close(fd)
        for name, peer in peers.items():
            peer.send('{"jsonrpc":"2.0","method":"query-version","id":1000}')
            got, fds = peer.message()
            assert not fds and '"id":1000' in got, f"{name} got more than shown: {got}"
    finally:
        for peer in peers.values():
            peer.close()
    return steps


def test_transcripts_are_what_the_daemon_answers(start_daemon: Callable[..., Daemon]) -> None:
    blocks = REPLAY_RE.findall(DOC.read_text())
    assert len(blocks) >= 2
    for timeout, block in blocks:
        d = start_daemon(f"[limits]\nack-timeout = {timeout}\n")
        assert replay(d, block) >= 10
        d.stop()
