"""virtio-mem attachments (docs/protocol.md §13) with a real guest kernel under QEMU.

The guest (tests/guest/, Debian's kernel, TCG when KVM is not usable) onlines what its
virtio-mem driver plugs; the daemon attaches a ``file`` block as the device's memory and
follows what the guest plugs. The file's allocated bytes are read from the file itself
(``st_blocks``) and from ``query-ram-blocks`` ``resident``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw
from qemu_support import MiB, Qemu

pytestmark = [pytest.mark.qemu, pytest.mark.guest]

#: Guest RAM at boot, and the most the block (and the device) may plug, in MiB.
BOOT_MIB = 256
MAX_MIB = 512
#: What the guest is asked to plug.
PLUG = 256 * MiB
#: A bound for a hung guest under TCG (not a performance assertion).
GUEST_TIMEOUT = 240.0


@pytest.fixture
def vm_daemon(start_daemon: Callable[..., Daemon]) -> Iterator[Daemon]:
    """A daemon with a tmpfs memory-dir (``file`` blocks); 10 s for each VMM step."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    try:
        d = start_daemon(f'memory-dir = "{parent}/mem"\n[limits]\nack-timeout = 10\n')
        yield d
        d.stop()  # first: it may still write the metadata of a block whose VMM just exited
    finally:
        shutil.rmtree(parent)


@pytest.fixture
def guest() -> Iterator[Qemu]:
    """The test guest on ``-machine pc`` with room for a 512 MiB virtio-mem device."""
    with Qemu(machine="pc", memory=BOOT_MIB, maxmem=BOOT_MIB + MAX_MIB) as vm:
        yield vm


def _resized(rpc: Raw) -> list[tuple[int, int]]:
    return [
        (e["params"]["data"]["old-size"], e["params"]["data"]["new-size"])
        for e in rpc.events
        if e["method"] == "RAM_BLOCK_RESIZED"
    ]


def _until_resized_to(rpc: Raw, size: int) -> list[tuple[int, int]]:
    """Read events until a ``RAM_BLOCK_RESIZED`` to ``size``; all resizes seen so far."""
    deadline = time.monotonic() + GUEST_TIMEOUT
    while not any(new == size for _, new in _resized(rpc)):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no RAM_BLOCK_RESIZED to {size:#x}: {_resized(rpc)}")
        rpc.sock.settimeout(left)
        msg = rpc.line()
        assert isinstance(msg, dict) and "method" in msg, msg
        rpc.events.append(msg)
    return _resized(rpc)


def _block(rpc: Raw, resident: bool = False) -> dict[str, Any]:
    (info,) = rpc.call("query-ram-blocks", id="vm1", resident=resident)
    assert isinstance(info, dict)
    return info


def _vmm_view(vm: Qemu) -> dict[str, Any]:
    async def query() -> dict[str, Any]:
        async with vm.qmp(second=True) as client:
            devices = await client.execute("query-memory-devices")
        assert isinstance(devices, list) and len(devices) == 1, devices
        data: dict[str, Any] = devices[0]["data"]
        return data

    return asyncio.run(query())


def _file(path: str) -> tuple[int, int]:
    """The block file's length and allocated bytes."""
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def test_the_guest_plugs_256mib_through_a_block_and_unplugs_it(
    vm_daemon: Daemon, guest: Qemu
) -> None:
    """Attached as virtio-mem, a block's file is max-size long and sparse; a resize asks
    the guest, whose plugging the block's size and RAM_BLOCK_RESIZED follow, and whose use
    of the memory its allocated bytes follow; a detach the guest cannot follow times out and
    leaves the block attached; resize 0 brings size and allocated bytes back to 0; the daemon
    never shortens the file while QEMU maps it."""
    with Raw(vm_daemon.path) as rpc:
        rpc.call("subscribe", events=["RAM_BLOCK_RESIZED"], replay=False)
        rpc.call(
            "ram-block-add", id="vm1", size=2 * MiB, **{"max-size": MAX_MIB * MiB}, backend="file"
        )
        path = _block(rpc)["path"]
        info = rpc.call(
            "ram-block-attach",
            id="vm1",
            qmp=str(guest.qmp_path),
            **{"as": "virtio-mem", "requested-size": 0},
        )
        # nothing plugged yet: QEMU discarded the whole backend when the device came up
        assert info["size"] == 0 and info["max-size"] == MAX_MIB * MiB
        assert info["attachment"]["as"] == "virtio-mem"
        assert info["attachment"]["requested-size"] == 0
        assert info["attachment"]["addr"] == _vmm_view(guest)["memaddr"]
        assert _resized(rpc) == [(2 * MiB, 0)]
        assert _file(path) == (MAX_MIB * MiB, 0)
        before = guest.meminfo_kib()

        info = rpc.call("ram-block-resize", id="vm1", size=PLUG)
        assert info["attachment"]["requested-size"] == PLUG
        assert _vmm_view(guest)["requested-size"] == PLUG
        steps = _until_resized_to(rpc, PLUG)
        grown = [new for old, new in steps[1:]]
        assert grown == sorted(grown) and all(new > old for old, new in steps[1:]), steps
        assert _block(rpc)["size"] == PLUG == _vmm_view(guest)["size"]
        assert guest.meminfo_kib() == before + PLUG // 1024
        # the guest fills a tmpfs: its movable allocations land in the plugged memory
        guest.sh("mkdir -p /mnt && mount -t tmpfs -o size=400m fill /mnt")
        guest.sh("dd if=/dev/zero of=/mnt/f bs=1M count=320 2>/dev/null")
        length, allocated = _file(path)
        assert length == MAX_MIB * MiB and 64 * MiB <= allocated <= PLUG
        assert _block(rpc, resident=True)["resident"] == allocated

        # a size the device refuses: QEMU's text, nothing changes, no event
        rpc.events.clear()
        err = rpc.error("ram-block-resize", id="vm1", size=3 * MiB)
        assert err["message"] == (
            "VMM refused resizing RAM block 'vm1': 'requested-size' has to be multiples of"
            " 'block-size' (0x200000)"
        )
        info = _block(rpc)
        assert (info["size"], info["attachment"]["requested-size"]) == (PLUG, PLUG)
        assert _vmm_view(guest)["requested-size"] == PLUG

        # a detach while the guest cannot unplug (its tmpfs needs more than its boot memory):
        # the guest is asked for 0 bytes, the wait times out, the block stays attached
        err = rpc.error("ram-block-detach", id="vm1", timeout=2)
        assert err["message"] == "Timed out waiting for the VMM to release RAM block 'vm1'"
        info = _block(rpc)
        assert info["attachment"]["requested-size"] == 0 and info["size"] > 0
        assert info["leases"] == 1 and _vmm_view(guest)["requested-size"] == 0

        guest.sh("rm /mnt/f")
        info = rpc.call("ram-block-resize", id="vm1", size=0)
        assert info["attachment"]["requested-size"] == 0
        steps = _until_resized_to(rpc, 0)
        assert all(new < old for old, new in steps), steps
        assert rpc.events and all(e["params"]["data"]["ack"] is False for e in rpc.events)
        assert _file(path) == (MAX_MIB * MiB, 0)
        assert _block(rpc, resident=True)["resident"] == 0
        assert guest.meminfo_kib() == before
        assert _vmm_view(guest)["size"] == 0


def _qemu_fd_of(pid: int, target: str) -> str:
    """The path in ``/proc/PID/fd`` of QEMU's fd whose target starts with ``target``."""
    for n in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{n}").startswith(target):
            return f"/proc/{pid}/fd/{n}"
    raise AssertionError(f"QEMU pid {pid} holds no fd of {target}")


def test_detach_leaves_qemu_its_empty_device_and_del_never_shortens_the_file(
    vm_daemon: Daemon, guest: Qemu
) -> None:
    """Detach asks for 0 bytes and waits until the guest unplugged them; QEMU 7.2 cannot
    unplug the device, so the attachment ends there, its lease with it; the block's size is
    then fixed, and removing it leaves QEMU's mapping of the file as long as it was."""
    with Raw(vm_daemon.path) as rpc:
        rpc.call("subscribe", events=["RAM_BLOCK_RESIZED", "RAM_BLOCK_DETACHED"], replay=False)
        rpc.call(
            "ram-block-add", id="vm1", size=64 * MiB, **{"max-size": MAX_MIB * MiB}, backend="memfd"
        )
        info = rpc.call(
            "ram-block-attach", id="vm1", qmp=str(guest.qmp_path), **{"as": "virtio-mem"}
        )
        assert info["attachment"]["requested-size"] == 64 * MiB and info["leases"] == 1
        _until_resized_to(rpc, 64 * MiB)
        assert _vmm_view(guest)["size"] == 64 * MiB
        rpc.events.clear()
        assert rpc.call("ram-block-detach", id="vm1", timeout=GUEST_TIMEOUT) == {}
        assert _resized(rpc)[-1][1] == 0 and all(new < old for old, new in _resized(rpc))
        detached = [e["params"]["data"] for e in rpc.events if e["method"] == "RAM_BLOCK_DETACHED"]
        assert [d["reason"] for d in detached] == ["detached"]
        info = _block(rpc)
        assert info["size"] == 0 and "attachment" not in info and info["leases"] == 0
        assert (_vmm_view(guest)["size"], _vmm_view(guest)["requested-size"]) == (0, 0)
        err = rpc.error("ram-block-resize", id="vm1", size=4 * MiB)
        assert err["message"] == (
            f"RAM block 'vm1' is still mapped by VMM {guest.pid}, which cannot unplug its"
            " virtio-mem device ramd-vm1: its size is fixed until the VMM exits"
        )
        qemu_fd = _qemu_fd_of(guest.pid, "/memfd:ramd:vm1")
        rpc.call("ram-block-del", id="vm1")
        assert os.stat(qemu_fd).st_size == MAX_MIB * MiB
        assert guest.sh("echo alive") == "alive\n"
