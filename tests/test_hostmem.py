"""The memory layer against the real kernel: reserve, populate, release, free (anonymous
backend and the mmap steps; the shared backends are in test_backends.py)."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest
from procfs import PAGE, covering, mappings

from ramd.hostmem import libc
from ramd.hostmem.backend import AnonymousMemory
from ramd.hostmem.mmap_alloc import mmap_pagesize, mmap_populate, mmap_reserve

MiB = 1024 * 1024
GiB = 1024 * MiB


def test_libc_errors_carry_errno() -> None:
    with pytest.raises(OSError) as exc:
        libc.munmap(PAGE + 1, PAGE)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        libc.madvise(PAGE + 1, PAGE, 4)
    assert exc.value.errno == errno.EINVAL


def test_pagesize_anonymous_and_regular_fd() -> None:
    assert mmap_pagesize() == PAGE
    fd = os.memfd_create("ramd-test")
    try:
        assert mmap_pagesize(fd) == PAGE
    finally:
        os.close(fd)


def test_pagesize_hugetlbfs_fd_is_its_block_size() -> None:
    try:
        fd = os.memfd_create("ramd-huge", os.MFD_HUGETLB)
    except OSError as e:
        pytest.skip(f"kernel has no hugetlbfs memfd: {e}")
    try:
        size = mmap_pagesize(fd)
    finally:
        os.close(fd)
    with open("/proc/meminfo") as f:
        huge_kb = next(int(line.split()[1]) for line in f if line.startswith("Hugepagesize:"))
    assert size == huge_kb * 1024 > PAGE


def _anonymous(size: int, max_size: int, align: int) -> AnonymousMemory:
    mem = AnonymousMemory()
    mem.reserve(max_size, align)
    mem.populate(0, size)
    return mem


def test_alloc_layout_alignment_and_guard() -> None:
    align = 64 * MiB
    size, max_size = 4 * MiB, 1024 * GiB
    mem = _anonymous(size, max_size, align)
    ptr = mem.host
    try:
        assert ptr % align == 0
        used = covering(ptr, ptr + size)
        assert [(m.start, m.end, m.perms) for m in used] == [(ptr, ptr + size, "rw-p")]
        assert "ac" in used[0].flags
        reserved = covering(ptr + size, ptr + max_size + PAGE)
        assert [(m.start, m.end, m.perms) for m in reserved] == [
            (ptr + size, ptr + max_size + PAGE, "---p")
        ]
        assert "ac" not in reserved[0].flags and "nr" in reserved[0].flags
    finally:
        mem.free()
    assert covering(ptr, ptr + max_size + PAGE) == []
    assert mem.host == 0
    mem.free()


def test_reservation_ends_with_exactly_one_guard_page() -> None:
    size, max_size = PAGE, 16 * PAGE
    mem = _anonymous(size, max_size, PAGE)
    ptr = mem.host
    try:
        vma = next(m for m in mappings() if m.start <= ptr + size < m.end)
        assert vma.start == ptr + size and vma.end == ptr + max_size + PAGE
        assert vma.perms == "---p"
    finally:
        mem.free()


def test_grow_shrink_in_place() -> None:
    mem = _anonymous(PAGE, 64 * PAGE, PAGE)
    ptr = mem.host
    try:
        ctypes.memset(ptr, 0x5A, PAGE)
        mem.populate(PAGE, 8 * PAGE)
        assert [(m.start, m.end, m.perms) for m in covering(ptr, ptr + 8 * PAGE)] == [
            (ptr, ptr + 8 * PAGE, "rw-p")
        ]
        assert ctypes.string_at(ptr, PAGE) == b"\x5a" * PAGE
        assert ctypes.string_at(ptr + PAGE, 7 * PAGE) == bytes(7 * PAGE)
        ctypes.memset(ptr + PAGE, 0x11, 7 * PAGE)
        mem.release(2 * PAGE, 8 * PAGE)
        assert covering(ptr + 2 * PAGE, ptr + 8 * PAGE)[0].perms == "---p"
        mem.populate(2 * PAGE, 8 * PAGE)
        assert ctypes.string_at(ptr + 2 * PAGE, 6 * PAGE) == bytes(6 * PAGE)
        assert ctypes.string_at(ptr + PAGE, PAGE) == b"\x11" * PAGE
    finally:
        mem.free()


def test_shared_fd_backed_populate_reaches_the_file() -> None:
    fd = os.memfd_create("ramd-shared")
    try:
        os.ftruncate(fd, 4 * PAGE)
        base = mmap_reserve(0, 4 * PAGE)
        try:
            mmap_populate(base + PAGE, 3 * PAGE, fd, PAGE)
            assert [(m.start, m.end, m.perms) for m in covering(base, base + 4 * PAGE)] == [
                (base, base + PAGE, "---p"),
                (base + PAGE, base + 4 * PAGE, "rw-s"),
            ]
            ctypes.memmove(base + PAGE, b"hello", 5)
            assert os.pread(fd, 5, PAGE) == b"hello"
        finally:
            libc.munmap(base, 4 * PAGE)
    finally:
        os.close(fd)


def test_impossible_populate_fails_with_enomem_and_keeps_the_reservation() -> None:
    max_size = 1024 * GiB
    mem = _anonymous(PAGE, max_size, PAGE)
    ptr = mem.host
    try:
        before = covering(ptr, ptr + max_size + PAGE)
        with pytest.raises(OSError) as exc:
            mem.populate(PAGE, 512 * GiB)
        assert exc.value.errno == errno.ENOMEM
        after = covering(ptr, ptr + max_size + PAGE)
        assert [(m.start, m.end, m.perms) for m in after] == [
            (m.start, m.end, m.perms) for m in before
        ]
    finally:
        mem.free()


def test_mlock_and_munlock_set_and_clear_the_locked_flag() -> None:
    mem = _anonymous(4 * PAGE, 4 * PAGE, PAGE)
    ptr = mem.host
    try:
        libc.mlock(ptr, 4 * PAGE)
        assert "lo" in covering(ptr, ptr + 4 * PAGE)[0].flags
        assert libc.mincore_resident(ptr, 4 * PAGE) == 4
        libc.munlock(ptr, 4 * PAGE)
        assert "lo" not in covering(ptr, ptr + 4 * PAGE)[0].flags
    finally:
        mem.free()
