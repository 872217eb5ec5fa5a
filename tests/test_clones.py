"""Clones of a sealed template in real QEMU 7.2 processes (docs/protocol.md §14): each started by
``ramctl exec --block TEMPLATE -- qemu ... memory-backend-file,...,share=off`` maps the
template privately; and a pooled block mapped by QEMU with huge pages. Real daemon, real
ramctl, real QEMU (TCG, stopped: ``-S``).

A stopped QEMU runs no guest code, so the write "through one clone's guest" is made by
QEMU itself into its guest RAM: the generic ``loader`` device stores its bytes at a guest
address at machine reset (start-up), through the clone's own mapping, as guest code would.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procfs
import pytest
from daemon import Daemon, Raw

MiB = 1 << 20
RAMCTL = [sys.executable, "-m", "ramd_client.cli"]
QEMU = shutil.which("qemu-system-x86_64")
SIZE = 64 * MiB
#: Guest-physical address of the template's marker, and the marker.
ADDR = 0x100000
MARK = b"TEMPLATE"
#: What clone 0 writes there.
OWN = b"CLONE#0!"


class Qmp:
    """A QMP connection to a QEMU, negotiated."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                assert time.monotonic() < deadline, f"QEMU's QMP socket {path} never came"
                time.sleep(0.05)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())
        self.run("qmp_capabilities")

    def run(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode())
        self.f.flush()
        while "return" not in (msg := json.loads(self.f.readline())):
            assert "error" not in msg, msg
        return msg["return"]

    def hmp(self, line: str) -> str:
        return str(self.run("human-monitor-command", **{"command-line": line}))

    def guest_bytes(self, addr: int, n: int) -> bytes:
        """``n`` bytes of guest-physical memory at ``addr`` (HMP ``xp``)."""
        out = self.hmp(f"xp /{n}xb {addr:#x}")
        return bytes(int(x, 16) for line in out.splitlines() for x in line.split(":")[1].split())

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def _qemu(
    d: Daemon, qmp: Path, *extra: str, block: str = "tpl", options: str = "share=off"
) -> subprocess.Popen[bytes]:
    """``ramctl exec --block BLOCK -- qemu ...``: its RAM is the block's fd, mapped with the
    memory backend's ``options`` (by default privately: a clone)."""
    assert QEMU is not None, "qemu-system-x86_64 is missing: .ci/run installs it"
    return subprocess.Popen(
        [
            *RAMCTL, "--socket", str(d.path), "exec", "--block", block, "--",
            QEMU, "-machine", "pc,accel=tcg,memory-backend=ram0", "-m", "64M",
            "-object",
            f"memory-backend-file,id=ram0,mem-path=/proc/self/fd/{{fd}},size=64M,{options}",
            "-S", "-display", "none", "-nodefaults", "-qmp", f"unix:{qmp},server=on,wait=off",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def _template_mapping(pid: int) -> dict[str, int]:
    """The smaps figures (bytes) of ``pid``'s mapping of the template's memfd."""
    vmas = [m for m in procfs.mappings(pid) if "memfd:ramd:tpl" in m.name]
    assert vmas, f"QEMU {pid} does not map the template"
    assert vmas[0].perms == "rw-p", vmas[0]  # private: copy-on-write
    return vmas[0].sizes


def test_three_qemu_clones_of_one_sealed_template(start_daemon: Any, tmp_path: Path) -> None:
    d = start_daemon()
    procs: list[subprocess.Popen[bytes]] = []
    qmps: list[Qmp] = []
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="tpl", size=SIZE, backend="memfd", prealloc=True)
        # the template's bytes: a marker, and every MiB of it non-zero
        rpc.call("ram-block-write", id="tpl", offset=ADDR, data=base64.b64encode(MARK).decode())
        for mib in range(2, 64):
            data = base64.b64encode(bytes([mib]) * 4096).decode()
            rpc.call("ram-block-write", id="tpl", offset=mib * MiB, data=data)
        rpc.call("ram-block-seal", id="tpl")
        try:
            # clone 0 writes its own bytes over the marker as it starts (x86: little-endian)
            value = int.from_bytes(OWN, "little")
            written = "-device", f"loader,addr={ADDR:#x},data={value:#x},data-len={len(OWN)}"
            for i in range(3):
                qmp = tmp_path / f"clone{i}.qmp"
                procs.append(_qemu(d, qmp, *(written if i == 0 else ())))
                qmps.append(Qmp(qmp))
            info = rpc.call("query-ram-blocks", id="tpl")[0]
            assert info["leases"] == 3 and info["sealed"]

            # same guest address, the template's bytes; clone 0's write is its own
            assert qmps[0].guest_bytes(ADDR, 8) == OWN
            for q in qmps[1:]:
                assert q.guest_bytes(ADDR, 8) == MARK
                assert q.guest_bytes(63 * MiB, 4) == bytes([63]) * 4
            got = rpc.call("ram-block-read", id="tpl", offset=ADDR, length=8)["data"]
            assert base64.b64decode(got) == MARK

            # each clone reads all of its RAM; together they cost about one copy
            for q in qmps:
                assert q.hmp(f'pmemsave 0 {SIZE:#x} "/dev/null"') == ""
            maps = [_template_mapping(p.pid) for p in procs]
            for m in maps:
                assert m["Rss"] >= 60 * MiB, m  # all of the RAM was read ...
                assert m["Private_Dirty"] <= 2 * MiB, m  # ... and almost none of it copied
            assert sum(m["Pss"] for m in maps) <= SIZE + 6 * MiB, maps
            assert sum(m["Rss"] for m in maps) >= 3 * 60 * MiB
        finally:
            for q in qmps:
                q.close()
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
        rpc.call("ram-block-del", id="tpl")


def test_qemu_maps_a_pooled_block_with_huge_pages(start_daemon: Any, tmp_path: Path) -> None:
    """A memfd pool's blocks are made of transparent huge pages (tests/test_pools.py): QEMU
    given ``align=2M`` maps one 2 MiB-aligned, so its ``prealloc=on`` has one page table
    entry to fill per 2 MiB, and the guest's RAM is mapped by huge pages (docs/templates.md)."""
    if not procfs.shmem_collapse_works():
        pytest.skip("this kernel does not collapse a memfd into a huge page (MADV_COLLAPSE)")
    d = start_daemon('[[pool]]\nname = "vm"\nsize = "64M"\ncount = 1\n')
    with Raw(d.path) as rpc:
        deadline = time.monotonic() + 180
        while rpc.call("query-pools")[0]["ready"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        rpc.call("ram-block-add", id="vm0", pool="vm")
        qmp = tmp_path / "vm0.qmp"
        proc = _qemu(d, qmp, block="vm0", options="share=on,prealloc=on,align=2M")
        try:
            q = Qmp(qmp)
            assert q.guest_bytes(ADDR, 8) == bytes(8)
            q.close()
            ram = [m for m in procfs.mappings(proc.pid) if m.name.startswith("/memfd:ramd:pool:")]
            assert [(m.perms, m.start % (2 * MiB), m.end - m.start) for m in ram] == [
                ("rw-s", 0, SIZE)
            ]
            assert (ram[0].sizes["Rss"], ram[0].sizes["ShmemPmdMapped"]) == (SIZE, SIZE)
        finally:
            proc.terminate()
            proc.wait(30)
