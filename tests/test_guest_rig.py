"""The QEMU test rig itself (tests/qemu_support.py, tests/guest/): a real guest kernel boots
and answers on its console, virtio-mem plugs and unplugs memory in it, and a QEMU without a
guest hot-plugs a file-backed DIMM whose bytes ``xp`` reads. Later VMM tests build on these."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu_support import MiB, Qemu, guest_files, kvm_usable, xp

pytestmark = pytest.mark.qemu

OTHER_UID = 4250  # QEMU as a uid that is not root (libvirt's normal setup)


def _manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((guest_files()[0].parent / "manifest.json").read_text())
    return data


def _gone(pid: int) -> bool:
    """No such process, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.guest
@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_guest_boots_and_answers_on_its_console(accel: str) -> None:
    """Under TCG, and under KVM where usable: the guest runs Debian's kernel with the
    modules its initramfs loads, and the console loop gives each command's exact output and
    exit code, in order."""
    if accel == "kvm" and not kvm_usable():
        pytest.skip("KVM is not usable here (no vmx/svm, or /dev/kvm refuses): see kvm_usable")
    with Qemu(accel=accel) as vm:
        pid, workdir = vm.pid, vm.dir
        assert vm.sh("uname -r") == f"{_manifest()['kernel_release']}\n"
        assert vm.run("printf abc; echo to-stderr >&2; exit 3") == (3, "abcto-stderr\n")
        assert vm.sh("cat /sys/devices/system/memory/auto_online_blocks") == "online_movable\n"
        loaded = {line.split()[0] for line in vm.sh("cat /proc/modules").splitlines()}
        assert {"virtio_mem", "virtio_pci"} <= loaded
        assert [vm.sh(f"echo {i}") for i in range(5)] == [f"{i}\n" for i in range(5)]
        assert "@@RAMD-GUEST-ERROR" not in vm.console_text()
        assert vm.boot_seconds is not None
    assert _gone(pid) and not workdir.exists()


async def _memory_device(client: QMPClient) -> dict[str, Any]:
    devices = await client.execute("query-memory-devices")
    assert isinstance(devices, list) and len(devices) == 1, devices
    data: dict[str, Any] = devices[0]["data"]
    return data


async def _until(what: str, check: Any, timeout: float = 180.0) -> None:
    """Polls the coroutine function ``check`` until it returns true; fails after
    ``timeout`` seconds (a bound for a hung guest, not a performance assertion)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.mark.guest
@pytest.mark.parametrize("machine", ["pc", "q35"])
async def test_virtio_mem_plugs_256mib_into_the_guest_and_unplugs_it(machine: str) -> None:
    """``requested-size`` 256 MiB: QEMU's plugged size and the guest's MemTotal grow by
    exactly that; ``requested-size`` 0: both come back."""
    args = [
        "-object",
        "memory-backend-ram,id=vmem0,size=512M",
        "-device",
        "virtio-mem-pci,id=vm0,memdev=vmem0,block-size=2M,requested-size=0",
    ]
    with Qemu(machine=machine, memory=256, maxmem=256 + 512, args=args) as vm:
        bound = vm.sh("ls /sys/bus/virtio/drivers/virtio_mem").split()
        assert any(name.startswith("virtio") for name in bound), bound
        before = vm.meminfo_kib()
        async with vm.qmp(second=True) as client:
            dev = await _memory_device(client)
            assert (dev["size"], dev["max-size"], dev["block-size"]) == (0, 512 * MiB, 2 * MiB)

            for requested, grown in ((256 * MiB, 256 * 1024), (0, 0)):
                await client.execute(
                    "qom-set",
                    {
                        "path": "/machine/peripheral/vm0",
                        "property": "requested-size",
                        "value": requested,
                    },
                )

                async def plugged(size: int = requested) -> bool:
                    return bool((await _memory_device(client))["size"] == size)

                async def memtotal(kib: int = before + grown) -> bool:
                    return await asyncio.to_thread(vm.meminfo_kib) == kib

                await _until(f"QEMU's plugged size {requested}", plugged)
                await _until(f"guest MemTotal {before + grown} KiB", memtotal)
            assert (await _memory_device(client))["requested-size"] == 0


@pytest.mark.guest
async def test_the_guest_reads_a_file_backed_dimm_as_its_physical_memory(tmp_path: Path) -> None:
    """Bytes written into a DIMM's backing file (``share=on``) while the guest runs are what
    the guest's kernel reads at the DIMM's guest-physical address, and what ``xp`` reads."""
    backing = tmp_path / "dimm.bin"
    with open(backing, "wb") as f:
        f.truncate(128 * MiB)
    args = [
        "-object",
        f"memory-backend-file,id=mem1,mem-path={backing},size=128M,share=on",
        "-device",
        "pc-dimm,id=dimm1,memdev=mem1",
    ]
    with Qemu(memory=256, slots=2, maxmem=1024, args=args) as vm:
        async with vm.qmp(second=True) as client:
            address = (await _memory_device(client))["addr"]
            small, big = os.urandom(100), os.urandom(MiB)
            fd = os.open(backing, os.O_WRONLY)
            try:
                os.pwrite(fd, small, 127 * MiB + 12345)
                os.pwrite(fd, big, 120 * MiB)
            finally:
                os.close(fd)
            assert await asyncio.to_thread(vm.read_phys, address + 127 * MiB + 12345, 100) == small
            assert await xp(client, address + 127 * MiB + 12345, 100) == small
            digest = await asyncio.to_thread(vm.phys_sha256, address + 120 * MiB, MiB)
            assert digest == hashlib.sha256(big).hexdigest()


@pytest.mark.parametrize("runas", [None, (OTHER_UID, OTHER_UID)], ids=["root", "other-uid"])
async def test_pc_dimm_hotplug_without_a_guest_reads_the_backing_files_bytes(
    runas: tuple[int, int] | None,
) -> None:
    """``-machine pc`` with DIMM slots, paused, no guest: ``object-add memory-backend-file``
    and ``device_add pc-dimm`` work (also when QEMU runs as another uid, on a file that uid
    owns), and HMP ``xp`` at the DIMM's address reads the file's bytes."""
    head, tail = os.urandom(16), os.urandom(16)
    with Qemu(
        machine="pc", memory=128, slots=4, maxmem=1024, kernel=False, paused=True, runas=runas
    ) as vm:
        if runas is not None:
            status = Path(f"/proc/{vm.pid}/status").read_text()
            assert f"\nUid:\t{runas[0]}\t{runas[0]}\t{runas[0]}\t{runas[0]}\n" in status
        backing = vm.dir / "dimm.bin"
        with open(backing, "wb") as f:
            f.truncate(128 * MiB)
            f.write(head)
            f.seek(100 * MiB)
            f.write(tail)
        if runas is not None:
            os.chown(backing, *runas)
            backing.chmod(0o600)
        async with vm.qmp() as client:
            await client.execute(
                "object-add",
                {
                    "qom-type": "memory-backend-file",
                    "id": "mem1",
                    "mem-path": str(backing),
                    "size": 128 * MiB,
                    "share": True,
                },
            )
            await client.execute(
                "device_add", {"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"}
            )
            dev = await _memory_device(client)
            assert (dev["id"], dev["memdev"], dev["size"]) == ("dimm1", "/objects/mem1", 128 * MiB)
            assert await xp(client, dev["addr"], 16) == head
            assert await xp(client, dev["addr"] + 100 * MiB, 16) == tail
            state = await client.execute("query-status")
            assert isinstance(state, dict) and state["status"] == "prelaunch"
