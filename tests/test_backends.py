"""Shared backends (memfd, file, hugetlb) against the real kernel: layout, file length,
memory release, fd sharing across processes, and truncation by another process."""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ramd_client
from daemon import Daemon
from procfs import PAGE, covering

from ramd.errors import RamdError
from ramd.hostmem import libc, linux
from ramd.hostmem.mmap_alloc import mmap_populate, mmap_reserve
from ramd.ramblock import RAMBlock, RAMList

MiB = 1024 * 1024
SHARED = ["memfd", "file"]


@pytest.fixture
def memory_dir() -> Iterator[Path]:
    """A not yet existing memory-dir on tmpfs (``/dev/shm``), removed with its files after."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    yield parent / "mem"
    shutil.rmtree(parent)


@pytest.fixture
def ram(memory_dir: Path) -> Iterator[RAMList]:
    rl = RAMList(memory_dir)
    yield rl
    rl.close()


def _layout(block: RAMBlock) -> list[tuple[int, int, str]]:
    """The block's reservation as (start, end, perms), adjacent VMAs of equal perms merged
    (the kernel keeps hugetlb VMAs mapped separately apart)."""
    out: list[tuple[int, int, str]] = []
    for m in covering(block.host, block.host + block.max_size + block.page_size):
        if out and out[-1][1] == m.start and out[-1][2] == m.perms:
            out[-1] = (out[-1][0], m.end, m.perms)
        else:
            out.append((m.start, m.end, m.perms))
    return out


def _file_size(block: RAMBlock) -> int:
    return os.fstat(block.fd).st_size


def _allocated(block: RAMBlock) -> int:
    return os.fstat(block.fd).st_blocks * 512


@pytest.mark.parametrize("backend", SHARED)
def test_shared_layout_used_range_rw_s_tail_reserved(ram: RAMList, backend: str) -> None:
    b = ram.add("s", 4 * PAGE, 64 * PAGE, backend=backend)  # type: ignore[arg-type]
    assert (b.backend, b.shared, b.persistent, b.hugetlb) == (
        backend,
        True,
        backend == "file",
        False,
    )
    assert b.fd >= 0 and stat.S_ISREG(os.fstat(b.fd).st_mode)
    assert _layout(b) == [
        (b.host, b.host + 4 * PAGE, "rw-s"),
        (b.host + 4 * PAGE, b.host + 65 * PAGE, "---p"),
    ]
    tail = covering(b.host + b.size, b.host + b.max_size)
    assert "ac" not in tail[0].flags and "nr" in tail[0].flags
    assert _file_size(b) == b.size
    with open("/proc/self/maps") as f:
        line = next(ln for ln in f if ln.startswith(f"{b.host:x}-"))
    if backend == "memfd":
        assert b.path is None
        assert "/memfd:ramd:s (deleted)" in line
    else:
        assert b.path == str(ram.memory_dir) + "/s" and line.rstrip().endswith(b.path)
        assert stat.S_IMODE(os.stat(b.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(ram.memory_dir).st_mode) == 0o700


@pytest.mark.parametrize("backend", SHARED)
def test_file_length_is_the_size_after_add_grow_shrink(ram: RAMList, backend: str) -> None:
    b = ram.add("s", PAGE + 1, 64 * PAGE, backend=backend)  # type: ignore[arg-type]
    assert b.size == _file_size(b) == 2 * PAGE
    for new in (40 * PAGE, 3 * PAGE, 64 * PAGE, PAGE):
        ram.resize("s", new)
        assert b.size == _file_size(b) == new
        assert _layout(b) == [
            (b.host, b.host + new, "rw-s"),
            (b.host + new, b.host + 65 * PAGE, "---p"),
        ]


@pytest.mark.parametrize("backend", SHARED)
def test_shrink_releases_memory_and_growing_back_reads_zeros(ram: RAMList, backend: str) -> None:
    b = ram.add("s", 64 * MiB, 128 * MiB, backend=backend)  # type: ignore[arg-type]
    ram.write("s", 0, b"\xaa" * MiB)
    ram.write("s", 63 * MiB, b"\xbb" * MiB)
    assert _allocated(b) == 64 * MiB == b.resident()
    ram.resize("s", 8 * MiB)
    assert _allocated(b) == 8 * MiB == b.resident()
    ram.resize("s", 64 * MiB)
    assert ram.read("s", 0, MiB) == b"\xaa" * MiB
    assert ram.read("s", 63 * MiB, MiB) == bytes(MiB)


@pytest.mark.parametrize("backend", SHARED)
def test_discard_punches_a_hole(ram: RAMList, backend: str) -> None:
    b = ram.add("s", 16 * PAGE, backend=backend)  # type: ignore[arg-type]
    ram.write("s", 0, b"\xff" * (16 * PAGE))
    assert _allocated(b) == 16 * PAGE
    ram.discard("s", 4 * PAGE, 8 * PAGE)
    assert _allocated(b) == 8 * PAGE == b.resident()
    assert _file_size(b) == 16 * PAGE
    assert ram.read("s", 4 * PAGE, 8 * PAGE) == bytes(8 * PAGE)
    assert ram.read("s", 0, 4 * PAGE) == b"\xff" * (4 * PAGE)
    assert ram.read("s", 12 * PAGE, 4 * PAGE) == b"\xff" * (4 * PAGE)


def _child_touch(addr: int) -> int:
    """Fork; the child reads one byte at ``addr``. Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()
        try:
            ctypes.string_at(addr, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("backend", SHARED)
def test_touching_past_size_is_sigsegv(ram: RAMList, backend: str) -> None:
    b = ram.add("s", 4 * PAGE, 64 * PAGE, backend=backend)  # type: ignore[arg-type]
    ok = _child_touch(b.host + b.size - 1)
    assert os.WIFEXITED(ok) and os.WEXITSTATUS(ok) == 0
    for addr in (b.host + b.size, b.host + b.max_size):
        bad = _child_touch(addr)
        assert os.WIFSIGNALED(bad) and os.WTERMSIG(bad) == signal.SIGSEGV
    ram.resize("s", 2 * PAGE)
    shrunk = _child_touch(b.host + 2 * PAGE)
    assert os.WIFSIGNALED(shrunk) and os.WTERMSIG(shrunk) == signal.SIGSEGV


_MAPPER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, mmap.MAP_SHARED)
sys.stdout.write(m[int(sys.argv[2]):int(sys.argv[2]) + 5].decode())
m[size - 6:] = b"mapper"
"""


@pytest.mark.parametrize("backend", SHARED)
def test_another_process_maps_the_fd_and_shares_the_memory(ram: RAMList, backend: str) -> None:
    b = ram.add("s", 4 * PAGE, 8 * PAGE, backend=backend)  # type: ignore[arg-type]
    ram.write("s", PAGE, b"hello")
    out = subprocess.run(
        [sys.executable, "-c", _MAPPER, f"/proc/{os.getpid()}/fd/{b.fd}", str(PAGE)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert out.stdout == b"hello"
    assert ram.read("s", b.size - 6, 6) == b"mapper"


def _reopen(block: RAMBlock) -> int:
    return os.open(f"/proc/self/fd/{block.fd}", os.O_RDWR)


@pytest.mark.parametrize("backend", SHARED)
def test_truncated_by_another_opener_reads_and_writes_fail_cleanly(
    ram: RAMList, backend: str
) -> None:
    b = ram.add("s", 4 * PAGE, 8 * PAGE, backend=backend)  # type: ignore[arg-type]
    ram.write("s", 0, b"x" * PAGE)
    other = _reopen(b)
    try:
        os.ftruncate(other, PAGE)
    finally:
        os.close(other)
    assert ram.read("s", 0, PAGE) == b"x" * PAGE
    with pytest.raises(RamdError) as exc:
        ram.read("s", 0, 2 * PAGE)
    assert exc.value.desc == (
        "Cannot read RAM block 's': its file is 0x1000 bytes, shorter than its size 0x4000"
        " (changed by another process)"
    )
    with pytest.raises(RamdError, match=r"^Cannot write RAM block 's': its file is 0x1000"):
        ram.write("s", 3 * PAGE, b"y")
    assert _file_size(b) == PAGE
    ram.resize("s", 8 * PAGE)
    assert _file_size(b) == 8 * PAGE
    assert ram.read("s", 0, 8 * PAGE) == b"x" * PAGE + bytes(7 * PAGE)


def test_copy_into_own_mapping_stops_at_a_truncated_page_without_sigbus() -> None:
    fd = os.memfd_create("ramd-copy")
    base = mmap_reserve(0, 2 * PAGE)
    try:
        os.ftruncate(fd, 2 * PAGE)
        mmap_populate(base, 2 * PAGE, fd)
        os.ftruncate(fd, PAGE)
        assert linux.copy_into_own_mapping(base, b"z" * (2 * PAGE)) == PAGE
        assert os.pread(fd, PAGE, 0) == b"z" * PAGE
        assert linux.copy_into_own_mapping(base + PAGE, b"z") == 0
    finally:
        libc.munmap(base, 2 * PAGE)
        os.close(fd)


def test_file_block_refuses_an_existing_file_and_leaves_it(ram: RAMList, memory_dir: Path) -> None:
    ram.add("first", PAGE, backend="file")
    (memory_dir / "taken").write_bytes(b"someone else's")
    with pytest.raises(RamdError) as exc:
        ram.add("taken", PAGE, backend="file")
    assert exc.value.error_class == "GenericError"
    assert exc.value.desc == (
        f"Cannot create RAM block 'taken': file '{memory_dir}/taken' already exists"
    )
    assert (memory_dir / "taken").read_bytes() == b"someone else's"
    assert "taken" not in ram and ram.used == PAGE


def test_remove_deletes_the_file_close_keeps_it(memory_dir: Path) -> None:
    rl = RAMList(memory_dir)
    a = rl.add("a", PAGE, backend="file")
    kept = rl.add("kept", 2 * PAGE, backend="file")
    rl.write("kept", 0, b"persist")
    rl.remove("a")
    assert not (memory_dir / "a").exists()
    assert covering(a.host, a.host + 2 * PAGE) == []
    host = kept.host
    rl.close()
    assert covering(host, host + 3 * PAGE) == [] and kept.fd == -1
    assert (memory_dir / "kept").read_bytes()[:7] == b"persist"
    assert sorted(os.listdir(memory_dir)) == [".lock", "kept", "kept.meta"]


def test_failed_file_block_leaves_no_file(ram: RAMList, memory_dir: Path) -> None:
    with pytest.raises(RamdError, match="Size too large"):
        ram.add("f", 4 * PAGE, 2 * PAGE, backend="file")
    with pytest.raises(RamdError, match="merge applies to anonymous blocks only"):
        ram.add("m", PAGE, backend="file", merge=True)
    assert _entries(memory_dir) == []
    pending = ram.create("p", PAGE, backend="file")
    assert (memory_dir / "p").exists()
    ram.abort(pending)
    assert _entries(memory_dir) == [] and ram.used == 0 and ram.reserved == 0


def test_setting_rules_per_backend(ram: RAMList) -> None:
    for setting in ("merge", "hugepages"):
        with pytest.raises(RamdError) as exc:
            ram.add("m", PAGE, backend="memfd", **{setting: True})  # type: ignore[arg-type]
        assert exc.value.desc == (
            f"Cannot create RAM block 'm': {setting} applies to anonymous blocks only"
            " (backend memfd)"
        )
    with pytest.raises(RamdError, match="hugetlb needs backend memfd or file"):
        ram.add("a", PAGE, hugetlb=True)
    with pytest.raises(RamdError, match="hugetlb needs a memory-dir on hugetlbfs"):
        ram.add("f", PAGE, backend="file", hugetlb=True)
    b = ram.add("l", 4 * PAGE, 8 * PAGE, backend="memfd", lock=True, dump=False)
    ram.resize("l", 8 * PAGE)
    for m in covering(b.host, b.host + b.size):
        assert m.perms == "rw-s" and {"lo", "dd"} <= m.flags
    ram.discard("l", 0, 2 * PAGE)
    assert all("lo" in m.flags for m in covering(b.host, b.host + b.size))
    assert len(ram) == 1


def test_memory_dir_is_refused_when_unsafe(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    for name, reason in (("link", "Not a directory"), ("open", "writable")):
        rl = RAMList(tmp_path / name)
        with pytest.raises(RamdError) as exc:
            rl.add("f", PAGE, backend="file")
        assert exc.value.desc.startswith(f"Cannot use memory-dir '{tmp_path / name}': ")
        assert reason in exc.value.desc
        rl.close()
    assert os.listdir(tmp_path / "real") == [] and os.listdir(tmp_path / "open") == []


def test_memfd_grow_beyond_available_memory_is_enomem_and_changes_nothing(
    ram: RAMList,
) -> None:
    b = ram.add("s", 2 * PAGE, 1 << 42, backend="memfd")
    ram.write("s", 0, b"keep me")
    before = _layout(b)
    impossible = 2 * linux.mem_available()
    impossible -= impossible % PAGE
    with pytest.raises(RamdError) as exc:
        ram.resize("s", impossible)
    assert exc.value.errno == errno.ENOMEM
    assert exc.value.desc == f"Cannot grow s to 0x{impossible:x}: Cannot allocate memory"
    assert (b.size, _file_size(b), _layout(b)) == (2 * PAGE, 2 * PAGE, before)
    assert ram.read("s", 0, 7) == b"keep me"


def test_prealloc_shared_block_is_allocated(ram: RAMList) -> None:
    b = ram.add("p", 8 * MiB, backend="memfd", prealloc=True)
    assert _allocated(b) == 8 * MiB == b.resident()


# -- hugetlb ---------------------------------------------------------------------------------

NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
#: Held (flock) by whoever changes the huge page pool for a test.
HUGEPAGES_LOCK = "/tmp/ramd-tests-hugepages.lock"


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


@pytest.fixture
def huge_pages() -> Iterator[Callable[[], int]]:
    """Four more huge pages in the pool than before; the old pool size is restored after,
    whatever happens. Yields a function giving the huge pages free to reserve right now.

    The pool is machine-wide: a lock file held meanwhile keeps every other test that uses it
    out, in this run's other process and in any other test run on the machine."""
    with open("/proc/sys/vm/nr_overcommit_hugepages") as f:
        if int(f.read()):
            pytest.skip("vm.nr_overcommit_hugepages is set: the pool's size is not its limit")
    with open(HUGEPAGES_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _more_huge_pages()


def _more_huge_pages() -> Iterator[Callable[[], int]]:
    # Pages still in use when an earlier pool size was restored became surplus pages; raising
    # the pool now would turn them back into pool pages that are in use, and free pages would
    # appear later, under the test, as their holder exits. Wait for such a holder to be gone.
    deadline = time.monotonic() + 60
    while _meminfo("HugePages_Surp"):
        if time.monotonic() > deadline:
            pytest.fail("surplus huge pages are still in use 60 s on (a leftover holder)")
        time.sleep(0.05)
    with open(NR_HUGEPAGES) as f:
        old = int(f.read())
    try:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old + 4))
        with open(NR_HUGEPAGES) as f:
            got = int(f.read())
        if got < old + 4:
            pytest.skip(f"the kernel gave {got - old} of 4 huge pages (memory fragmented)")
        yield lambda: _meminfo("HugePages_Free") - _meminfo("HugePages_Rsvd")
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(old))


@pytest.mark.xdist_group("hugepages")  # changes vm.nr_hugepages: one at a time
def test_hugetlb_memfd_grow_beyond_the_pool_fails_cleanly(
    ram: RAMList, huge_pages: Callable[[], int]
) -> None:
    hp = _meminfo("Hugepagesize") * 1024
    free = huge_pages()
    assert free >= 4
    b = ram.add("h", 1, 64 * hp, backend="memfd", hugetlb=True)
    assert (b.page_size, b.size, b.hugetlb, b.host % hp) == (hp, hp, True, 0)
    assert huge_pages() == free - 1
    ram.write("h", hp - 5, b"huge!")
    ram.resize("h", free * hp)
    assert huge_pages() == 0 and _file_size(b) == free * hp
    before = _layout(b)
    assert before == [
        (b.host, b.host + free * hp, "rw-s"),
        (b.host + free * hp, b.host + 65 * hp, "---p"),
    ]
    with pytest.raises(RamdError) as exc:
        ram.resize("h", (free + 1) * hp)
    assert exc.value.desc == f"Cannot grow h to 0x{(free + 1) * hp:x}: Cannot allocate memory"
    assert (b.size, _file_size(b), _layout(b)) == (free * hp, free * hp, before)
    assert ram.read("h", hp - 5, 5) == b"huge!"
    ram.write("h", free * hp - 4, b"last")
    assert ram.read("h", free * hp - 4, 4) == b"last"
    ram.discard("h", hp, hp)
    ram.resize("h", hp)
    assert huge_pages() == free - 1
    ram.remove("h")
    assert huge_pages() == free


# -- the daemon ------------------------------------------------------------------------------


def test_daemon_survives_a_mapper_truncating_a_file_block(
    start_daemon: Callable[..., Daemon], memory_dir: Path
) -> None:
    d = start_daemon(f'memory-dir = "{memory_dir}"\n')
    with ramd_client.Client(d.path, timeout=60) as c:
        info = c.call("ram-block-add", {"id": "f", "size": 4 * PAGE, "backend": "file"})
        assert (info["backend"], info["shared"], info["persistent"]) == ("file", True, True)
        assert info["path"] == f"{memory_dir}/f" and info["hugetlb"] is False
        c.ram_block_write("f", 0, b"\x01" * (4 * PAGE))
        with open(info["path"], "r+b") as f:
            assert f.read(4) == b"\x01" * 4
            f.truncate(0)
        with pytest.raises(ramd_client.RamdError) as exc:
            c.ram_block_read("f", 0, 4 * PAGE)
        assert str(exc.value.desc).startswith("Cannot read RAM block 'f': its file is 0x0 bytes")
        with pytest.raises(ramd_client.RamdError) as exc:
            c.ram_block_write("f", PAGE, b"\x02" * PAGE)
        assert exc.value.error_class == "GenericError"
        assert os.path.getsize(info["path"]) == 0
        assert [b.size for b in c.query_ram_blocks()] == [4 * PAGE]
        c.ram_block_del("f")
    assert d.alive() and _entries(memory_dir) == []
    assert d.stop() == 0


# -- memory-dir on its own mount (a private mount namespace: nothing outside sees it) ------

_IN_NAMESPACE = """
import json, os, subprocess, sys
from ramd.errors import RamdError
from ramd.ramblock import RAMList
fstype, options, mnt = sys.argv[1:4]
subprocess.run(["mount", "-t", fstype, "-o", options, "ramd-test", mnt], check=True)
rl = RAMList(mnt + "/mem")
hugetlb = fstype == "hugetlbfs"
page = 2 * 1024 * 1024 if hugetlb else 4096
b = rl.add("f", page, max(int(sys.argv[4]), 1024 * page), backend="file", hugetlb=hugetlb)
rl.write("f", page - 4, b"kept")
out = {"page-size": b.page_size, "hugetlb": b.hugetlb, "host": b.host % b.page_size}
try:
    rl.resize("f", int(sys.argv[4]))
    out["error"] = None
except RamdError as e:
    out["error"] = e.desc
out["size"] = b.size
out["file-size"] = os.fstat(b.fd).st_size
out["data"] = rl.read("f", page - 4, 4).decode()
rl.remove("f")
out["left"] = [n for n in os.listdir(mnt + "/mem") if n != ".lock"]
print(json.dumps(out))
"""


def _in_namespace(tmp_path: Path, fstype: str, options: str, grow_to: int) -> dict[str, object]:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("needs unshare(1) and mount(8) (util-linux)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c"]
    out = subprocess.run(
        [*cmd, _IN_NAMESPACE, fstype, options, str(mnt), str(grow_to)],
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()
    result: dict[str, object] = __import__("json").loads(out.stdout)
    return result


def test_file_block_on_a_full_tmpfs_grow_fails_with_enospc(tmp_path: Path) -> None:
    result = _in_namespace(tmp_path, "tmpfs", "size=1m,mode=0700", 2 * MiB)
    assert result == {
        "page-size": PAGE,
        "hugetlb": False,
        "host": 0,
        "error": "Cannot grow f to 0x200000: No space left on device",
        "size": PAGE,
        "file-size": PAGE,
        "data": "kept",
        "left": [],
    }


@pytest.mark.xdist_group("hugepages")  # changes vm.nr_hugepages: one at a time
def test_file_block_on_hugetlbfs_gets_huge_pages_and_a_clean_enomem(
    tmp_path: Path, huge_pages: Callable[[], int]
) -> None:
    hp = _meminfo("Hugepagesize") * 1024
    free = huge_pages()
    assert free >= 4
    # One page more than the whole pool: refused whoever else uses huge pages meanwhile.
    beyond = (_meminfo("HugePages_Total") + 1) * hp
    result = _in_namespace(tmp_path, "hugetlbfs", "mode=0700", beyond)
    assert result == {
        "page-size": hp,
        "hugetlb": True,
        "host": 0,
        "error": f"Cannot grow f to 0x{beyond:x}: Cannot allocate memory",
        "size": hp,
        "file-size": hp,
        "data": "kept",
        "left": [],
    }
    assert huge_pages() == free


def _entries(memory_dir: Path) -> list[str]:
    """The entries of ``memory_dir`` but the daemon's own (the lock file)."""
    return sorted(n for n in os.listdir(memory_dir) if n != ".lock")


@pytest.mark.xdist_group("hugepages")  # changes vm.nr_hugepages: one at a time
def test_a_hugetlb_memfd_block_can_be_sealed(ram: RAMList, huge_pages: Callable[[], int]) -> None:
    """docs/protocol.md §14: huge-page memfds are created sealable too; the sealed block's view
    is read-only, its contents stay, and the kernel holds the seals."""
    hp = _meminfo("Hugepagesize") * 1024
    b = ram.add("h", hp, backend="memfd", hugetlb=True)
    ram.write("h", hp - 8, b"template")
    assert ram.seal("h") is b and b.sealed
    assert ram.read("h", hp - 8, 8) == b"template"
    assert fcntl.fcntl(b.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
    assert _layout(b)[0] == (b.host, b.host + hp, "r--s")
    with pytest.raises(RamdError, match="RAM block 'h' is sealed"):
        ram.write("h", 0, b"x")
    ram.remove("h")


@pytest.mark.xdist_group("hugepages")  # changes vm.nr_hugepages: one at a time
def test_a_hugetlb_pool_gives_huge_page_blocks(
    start_daemon: Callable[..., Daemon], huge_pages: Callable[[], int]
) -> None:
    """docs/protocol.md §14: a ``hugetlb`` pool's blocks are huge-page memfds, made ready (their
    huge pages taken from the kernel's pool) before anyone asks."""
    hp = _meminfo("Hugepagesize") * 1024
    free = huge_pages()
    d = start_daemon(f'[[pool]]\nname = "huge"\nsize = {hp}\ncount = 2\nhugetlb = true\n')
    with ramd_client.Client(d.path) as c:
        deadline = time.monotonic() + 180
        while c.query_pools()[0].ready < 2:
            assert time.monotonic() < deadline, c.query_pools()
            time.sleep(0.02)
        assert huge_pages() == free - 2
        assert c.query_stats().pooled == 2 * hp
        b = c.ram_block_add_from_pool("h", "huge")
        assert (b.backend, b.hugetlb, b.page_size, b.size, b.prealloc) == (
            "memfd", True, hp, hp, True
        )  # fmt: skip
        assert c.ram_block_read("h", 0, 4096) == bytes(4096)
        assert c.ram_block_seal("h").sealed
        c.ram_block_del("h")
    assert d.stop() == 0
    assert huge_pages() == free  # the pooled pages went back with the daemon
