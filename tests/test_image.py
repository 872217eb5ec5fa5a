"""The image format (ramd.snapshot) on real files in tmp_path: round trips, holes, every
corruption refused with a clear error, cancel and SIGKILL never leaving a half image."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ramd.snapshot import (
    BlockDescriptor,
    ImageCancelled,
    ImageError,
    ImageInfo,
    atomic_target,
    load,
    open_image,
    open_state_dir,
    remove_stale_temporaries,
    verify,
    write_image,
)
from ramd.snapshot.format import HEADER_SIZE
from ramd.snapshot.scan import scan

PAGE = 4096
MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class Blocks:
    """Block contents held in bytearrays, with the callables the image code takes."""

    data: list[bytearray]
    descs: list[BlockDescriptor]
    written: int = 0
    zeroed: list[tuple[int, int, int]] = field(default_factory=list)

    def read(self, index: int, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[index][offset : offset + len(buf)]

    def write(self, index: int, offset: int, view: memoryview) -> None:
        self.data[index][offset : offset + len(view)] = view
        self.written += len(view)

    def zero(self, index: int, offset: int, length: int) -> None:
        assert offset % PAGE == 0 and length % PAGE == 0
        self.data[index][offset : offset + length] = bytes(length)
        self.zeroed.append((index, offset, length))

    def hashes(self) -> list[str]:
        return [hashlib.sha256(d).hexdigest() for d in self.data]

    def scribble(self) -> None:
        for d in self.data:
            d[:] = b"\xa5" * len(d)


def _desc(block_id: str, size: int, **kw: object) -> BlockDescriptor:
    args: dict[str, object] = {
        "max_size": size,
        "resizable": False,
        "page_size": PAGE,
        "backend": "anonymous",
        "settings": {},
    }
    args.update(kw)
    return BlockDescriptor(block_id, size, **args)  # type: ignore[arg-type]


def _mixed_blocks(rng: random.Random) -> Blocks:
    """Four blocks: all random, zero-heavy with scattered pages, small, every other page."""
    sizes = [3 * MiB, 16 * MiB, 3 * PAGE, 2 * MiB]
    data = [bytearray(s) for s in sizes]
    data[0][:] = rng.randbytes(sizes[0])
    for _ in range(40):
        off = rng.randrange(sizes[1] // PAGE) * PAGE
        data[1][off : off + PAGE] = rng.randbytes(PAGE)
    data[1][5 * MiB + 17] = 1  # a single byte in an otherwise zero page
    data[2][PAGE : 2 * PAGE] = rng.randbytes(PAGE)
    for off in range(0, sizes[3], 2 * PAGE):
        data[3][off : off + PAGE] = rng.randbytes(PAGE)
    descs = [
        _desc("rand", sizes[0], max_size=8 * MiB, resizable=True, settings={"prealloc": False}),
        _desc("sparse", sizes[1], backend="memfd", settings={"lock": True, "align": None}),
        _desc("small", sizes[2], settings={"hugetlb": False}),
        _desc("striped", sizes[3], page_size=2 * MiB, backend="file"),
    ]
    return Blocks(data, descs)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[int]:
    fd = open_state_dir(str(tmp_path / "state"))
    yield fd
    os.close(fd)


def _save(dir_fd: int, name: str, blocks: Blocks) -> ImageInfo:
    with atomic_target(dir_fd, name) as fd:
        return write_image(fd, blocks.descs, blocks.read)


def _path(tmp_path: Path, name: str) -> Path:
    return tmp_path / "state" / name


def _verify_path(path: Path) -> ImageInfo:
    fd = os.open(path, os.O_RDONLY)
    try:
        return verify(fd)
    finally:
        os.close(fd)


# -- round trip ----------------------------------------------------------------------------


def test_round_trip_restores_every_block_and_records_its_descriptor(
    tmp_path: Path, state_dir: int
) -> None:
    blocks = _mixed_blocks(random.Random(1))
    before = blocks.hashes()
    written = _save(state_dir, "snap", blocks)

    fd = open_image(state_dir, "snap")
    try:
        info = verify(fd)
        assert info == written
        assert [b.desc for b in info.blocks] == blocks.descs
        assert info.blocks[0].desc.settings == {"prealloc": False}
        blocks.scribble()
        load(fd, info, blocks.write, blocks.zero)
    finally:
        os.close(fd)
    assert blocks.hashes() == before
    # Every page with data went to write(); long zero runs went to zero(); nothing twice.
    total = sum(map(len, blocks.data))
    data_pages = sum(
        PAGE for d in blocks.data for p in range(0, len(d), PAGE) if any(d[p : p + PAGE])
    )
    assert data_pages <= blocks.written < total // 2
    assert blocks.written + sum(length for _, _, length in blocks.zeroed) == total


def test_zero_pages_are_holes_and_data_pages_are_not(tmp_path: Path, state_dir: int) -> None:
    blocks = _mixed_blocks(random.Random(2))
    info = _save(state_dir, "snap", blocks)
    fd = os.open(_path(tmp_path, "snap"), os.O_RDONLY)
    try:
        for index, block in enumerate(info.blocks):
            content = blocks.data[index]
            for off in range(0, block.size, PAGE):
                page_is_zero = not any(content[off : off + PAGE])
                try:
                    in_hole = os.lseek(fd, block.offset + off, os.SEEK_DATA) != block.offset + off
                except OSError as e:  # ENXIO: no data at all past this offset
                    assert e.errno == errno.ENXIO
                    in_hole = True
                assert in_hole == page_is_zero, (block.id, off)
    finally:
        os.close(fd)


def test_mostly_zero_1gib_image_is_sparse_and_loads_without_reading_holes(
    tmp_path: Path, state_dir: int
) -> None:
    size = GiB
    rng = random.Random(3)
    pages = {rng.randrange(size // PAGE) * PAGE: rng.randbytes(PAGE) for _ in range(64)}
    zero = bytes(8 * MiB)

    def read(index: int, offset: int, buf: memoryview) -> None:
        assert index == 0
        buf[:] = zero[: len(buf)]
        for p, content in pages.items():
            if offset <= p < offset + len(buf):
                buf[p - offset : p - offset + PAGE] = content

    progress: list[int] = []
    with atomic_target(state_dir, "big") as fd:
        info = write_image(fd, [_desc("ram0", size)], read, progress=progress.append)
    assert sum(progress) == size

    st = os.stat(_path(tmp_path, "big"))
    assert st.st_size == info.file_length > size
    allocated = st.st_blocks * 512
    assert allocated <= 64 * PAGE + 64 * 1024, allocated  # the data pages and the metadata

    def rchar() -> int:
        text = Path("/proc/thread-self/io").read_text()
        return int(re.search(r"^rchar: (\d+)", text, re.M).group(1))  # type: ignore[union-attr]

    fd = open_image(state_dir, "big")
    try:
        before = rchar()
        seen: list[int] = []
        assert verify(fd, progress=seen.append) == info
        assert sum(seen) == size
        # Only chunks holding data were read: the holes were skipped with SEEK_DATA.
        assert rchar() - before < 64 * 1024 * 1024

        got: dict[int, bytes] = {}
        zeroed = 0

        def write(index: int, offset: int, view: memoryview) -> None:
            for p in pages:
                if offset <= p < offset + len(view):
                    got[p] = bytes(view[p - offset : p - offset + PAGE])

        def zero_range(index: int, offset: int, length: int) -> None:
            nonlocal zeroed
            zeroed += length

        load(fd, info, write, zero_range)
    finally:
        os.close(fd)
    assert got == pages
    assert zeroed > size - 64 * 256 * 1024 - 1


# -- corruption ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, ImageInfo]:
    """The bytes of a small image with two blocks (random data, and a hole-heavy block)."""
    rng = random.Random(4)
    data = [bytearray(rng.randbytes(64 * 1024)), bytearray(512 * 1024)]
    data[1][300 * 1024 : 304 * 1024] = rng.randbytes(PAGE)
    blocks = Blocks(data, [_desc("alpha", 64 * 1024), _desc("beta", 512 * 1024)])
    path = tmp_path_factory.mktemp("img") / "small"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        info = write_image(fd, blocks.descs, blocks.read)
    finally:
        os.close(fd)
    return path.read_bytes(), info


def _image_with(tmp_path: Path, content: bytes, name: str = "bad") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _flip(content: bytes, offset: int) -> bytes:
    b = bytearray(content)
    b[offset] ^= 0x01
    return bytes(b)


def _expected_error(info: ImageInfo, offset: int) -> str:
    if offset < 8:
        return "Bad image: bad magic"
    if offset < 12:
        return "Bad image: unsupported version 0"  # byte 8 flipped: 1 ^ 1
    if offset < HEADER_SIZE:
        return "Bad image: header checksum mismatch"
    if offset < info.data_offset:
        return "Bad image: file checksum mismatch"
    block = next(b for b in info.blocks if b.offset <= offset < b.offset + b.size)
    return f"Bad image: checksum mismatch in block '{block.id}'"


@pytest.mark.parametrize(
    "where",
    [
        "magic",
        "version",
        "flags",
        "file-digest",
        "header-digest",
        "table",
        "padding",
        "data-alpha",
        "hole-beta",
        "data-beta",
        "last-byte",
    ],
)
def test_a_flipped_byte_fails_verify_with_a_clear_error(
    tmp_path: Path, small_image: tuple[bytes, ImageInfo], where: str
) -> None:
    content, info = small_image
    alpha, beta = info.blocks
    offsets = {
        "magic": 3,
        "version": 8,
        "flags": 12,
        "file-digest": 70,
        "header-digest": 120,
        "table": HEADER_SIZE + 40,
        "padding": info.data_offset - 1,
        "data-alpha": alpha.offset + 1000,
        "hole-beta": beta.offset + 10,
        "data-beta": beta.offset + 300 * 1024 + 7,
        "last-byte": len(content) - 1,
    }
    offset = offsets[where]
    path = _image_with(tmp_path, _flip(content, offset))
    expected = _expected_error(info, offset)
    with pytest.raises(ImageError) as e:
        _verify_path(path)
    assert e.value.desc == expected
    assert path.read_bytes() == _flip(content, offset), "verify must not change the file"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_a_flipped_bit_anywhere_fails_verify(
    tmp_path: Path, small_image: tuple[bytes, ImageInfo], data: st.DataObject
) -> None:
    content, _ = small_image
    offset = data.draw(st.integers(0, len(content) - 1), label="offset")
    bit = data.draw(st.integers(0, 7), label="bit")
    b = bytearray(content)
    b[offset] ^= 1 << bit
    path = _image_with(tmp_path, bytes(b), "prop")
    with pytest.raises(ImageError, match=r"^Bad image: "):
        _verify_path(path)


def test_wrong_version_with_a_valid_header_checksum_is_refused(
    tmp_path: Path, small_image: tuple[bytes, ImageInfo]
) -> None:
    import xxhash

    content, _ = small_image
    head = bytearray(content[:HEADER_SIZE])
    head[8:12] = (2).to_bytes(4, "little")
    head[112:128] = xxhash.xxh3_128_digest(bytes(head[:112]))
    path = _image_with(tmp_path, bytes(head) + content[HEADER_SIZE:])
    with pytest.raises(ImageError) as e:
        _verify_path(path)
    assert e.value.desc == "Bad image: unsupported version 2"


@pytest.mark.parametrize("cut", ["empty", "in-header", "in-table", "in-data", "last-byte"])
def test_truncated_image_is_refused(
    tmp_path: Path, small_image: tuple[bytes, ImageInfo], cut: str
) -> None:
    content, info = small_image
    length = {
        "empty": 0,
        "in-header": 60,
        "in-table": HEADER_SIZE + 10,
        "in-data": info.blocks[1].offset + 100,
        "last-byte": len(content) - 1,
    }[cut]
    path = _image_with(tmp_path, content[:length])
    with pytest.raises(ImageError, match=r"^Bad image: (empty file|truncated)"):
        _verify_path(path)


def test_bytes_past_the_end_are_refused(
    tmp_path: Path, small_image: tuple[bytes, ImageInfo]
) -> None:
    content, _ = small_image
    path = _image_with(tmp_path, content + b"x")
    with pytest.raises(ImageError, match=r"^Bad image: 1 bytes past its end$"):
        _verify_path(path)


def test_not_an_image_is_bad_magic(tmp_path: Path) -> None:
    path = _image_with(tmp_path, b"#!/bin/sh\n" + bytes(5000))
    with pytest.raises(ImageError, match=r"^Bad image: bad magic$"):
        _verify_path(path)


def test_a_change_after_verify_is_reported_by_load(
    tmp_path: Path, small_image: tuple[bytes, ImageInfo]
) -> None:
    content, _ = small_image
    path = _image_with(tmp_path, content)
    fd = os.open(path, os.O_RDWR)
    try:
        info = verify(fd)
        os.pwrite(fd, b"\xff", info.blocks[1].offset + 4096)
        sink = Blocks([bytearray(b.size) for b in info.blocks], [b.desc for b in info.blocks])
        with pytest.raises(ImageError, match=r"^Image changed after verification: block 'beta'$"):
            load(fd, info, sink.write, sink.zero)
    finally:
        os.close(fd)


# -- targets, cancel, crash ----------------------------------------------------------------


def test_cancel_mid_write_leaves_no_file_and_keeps_the_previous_image(
    tmp_path: Path, state_dir: int
) -> None:
    blocks = _mixed_blocks(random.Random(5))
    previous = _save(state_dir, "snap", blocks)
    old_bytes = _path(tmp_path, "snap").read_bytes()
    blocks.scribble()
    done: list[int] = []
    for name in ("snap", "fresh"):
        done.clear()
        with (
            pytest.raises(ImageCancelled, match=r"^Operation canceled$"),
            atomic_target(state_dir, name) as fd,
        ):
            write_image(
                fd,
                blocks.descs,
                blocks.read,
                progress=done.append,
                cancelled=lambda: len(done) >= 1,
            )
        assert len(done) == 1  # stopped after the first chunk
    assert sorted(os.listdir(tmp_path / "state")) == ["snap"]
    assert _path(tmp_path, "snap").read_bytes() == old_bytes
    assert _verify_path(_path(tmp_path, "snap")) == previous


def test_failed_write_to_a_plain_fd_leaves_it_empty(tmp_path: Path) -> None:
    blocks = _mixed_blocks(random.Random(6))
    path = tmp_path / "target"
    path.write_bytes(b"old contents")
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ImageCancelled):
            write_image(fd, blocks.descs, blocks.read, cancelled=lambda: True)
    finally:
        os.close(fd)
    assert path.stat().st_size == 0


def test_unusable_fds_are_refused(tmp_path: Path) -> None:
    blocks = _mixed_blocks(random.Random(7))
    r, w = os.pipe()
    try:
        with pytest.raises(ImageError, match=r"^Image fd is not a regular file$"):
            write_image(w, blocks.descs, blocks.read)
        with pytest.raises(ImageError, match=r"^Image fd is not a regular file$"):
            verify(r)
    finally:
        os.close(r)
        os.close(w)
    fd = os.open(tmp_path / "app", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        with pytest.raises(ImageError, match=r"^Image fd is in append mode$"):
            write_image(fd, blocks.descs, blocks.read)
    finally:
        os.close(fd)


def test_bad_descriptors_are_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT, 0o600)

    def read(index: int, offset: int, buf: memoryview) -> None:
        buf[:] = bytes(len(buf))

    try:
        for descs, text in [
            ([_desc("a", PAGE), _desc("a", PAGE)], "Duplicate block id 'a'"),
            ([_desc("../a", PAGE)], "Invalid block id '../a'"),
            ([_desc("a", 100)], "Block 'a': bad size 0x64 (max 0x64)"),
            (
                [_desc("a", PAGE, max_size=2 * PAGE)],
                "Block 'a': not resizable but max-size != size",
            ),
            ([_desc("a", PAGE, page_size=3000)], "Block 'a': bad page size 0xbb8"),
        ]:
            with pytest.raises(ImageError) as e:
                write_image(fd, descs, read)
            assert e.value.desc == text
    finally:
        os.close(fd)


def test_names_and_files_that_are_not_images_are_refused(tmp_path: Path, state_dir: int) -> None:
    for name in ["../x", ".hidden", "a/b", "", "x" * 65]:
        with pytest.raises(ImageError, match=r"^Invalid image name"):
            open_image(state_dir, name)
        with (
            pytest.raises(ImageError, match=r"^Invalid image name"),
            atomic_target(state_dir, name),
        ):
            pass
    with pytest.raises(ImageError, match=r"^Image 'none' not found$"):
        open_image(state_dir, "none")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"secret")
    os.symlink(target, _path(tmp_path, "link"))
    with pytest.raises(ImageError, match=r"^Cannot open image 'link': Too many levels"):
        open_image(state_dir, "link")
    os.mkfifo(_path(tmp_path, "fifo"))
    with pytest.raises(ImageError, match=r"^Image 'fifo' is not a regular file$"):
        open_image(state_dir, "fifo")


def test_a_state_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ImageError, match=r"is writable by another user$"):
        open_state_dir(str(shared))
    os.symlink(tmp_path, tmp_path / "via-link")
    with pytest.raises(ImageError, match=r"^Cannot open state directory"):
        open_state_dir(str(tmp_path / "via-link"))


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from ramd.snapshot import BlockDescriptor, atomic_target, open_state_dir, write_image

    size = 64 * 1024 * 1024
    calls = 0

    def read(index, offset, buf):
        global calls
        calls += 1
        if calls == 3:
            print("writing", flush=True)
            time.sleep(600)
        buf[:] = bytes([calls]) * len(buf)

    dfd = open_state_dir(sys.argv[1])
    desc = BlockDescriptor("ram0", size, size, False, 4096, "anonymous", {})
    with atomic_target(dfd, "snap") as fd:
        write_image(fd, [desc], read)
    """
)


def test_sigkill_during_a_write_leaves_the_previous_image_intact(
    tmp_path: Path, state_dir: int
) -> None:
    blocks = _mixed_blocks(random.Random(8))
    previous = _save(state_dir, "snap", blocks)
    old_bytes = _path(tmp_path, "snap").read_bytes()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "state")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "writing\n"
        temps = [n for n in os.listdir(tmp_path / "state") if n != "snap"]
        assert len(temps) == 1 and temps[0].startswith(".snap.")
        assert os.path.getsize(tmp_path / "state" / temps[0]) > 64 * MiB  # mid-write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert _path(tmp_path, "snap").read_bytes() == old_bytes
    assert _verify_path(_path(tmp_path, "snap")) == previous
    assert remove_stale_temporaries(state_dir) == temps
    assert os.listdir(tmp_path / "state") == ["snap"]


def test_cancel_during_load_stops_between_chunks(
    tmp_path: Path, small_image: tuple[bytes, ImageInfo]
) -> None:
    content, _ = small_image
    path = _image_with(tmp_path, content)
    fd = os.open(path, os.O_RDONLY)
    try:
        info = verify(fd)
        sink = Blocks([bytearray(b.size) for b in info.blocks], [b.desc for b in info.blocks])
        done: list[int] = []
        with pytest.raises(ImageCancelled):
            load(
                fd, info, sink.write, sink.zero, progress=done.append, cancelled=lambda: bool(done)
            )
    finally:
        os.close(fd)
    assert done == [info.blocks[0].size]  # the first block was complete, then it stopped
    assert sink.data[0] == bytearray(content[info.blocks[0].offset : info.blocks[1].offset])


def test_scan_splits_data_from_long_zero_runs_only() -> None:
    pages = "Z" * 20 + "D" + "Z" * 3 + "D" + "Z" * 16 + "DD" + "Z" * 10 + "D" * 11
    buf = bytearray(len(pages) * PAGE)
    for i, kind in enumerate(pages):
        if kind == "D":
            buf[i * PAGE + 100] = 7
    found = scan(buf, len(buf), 16 * PAGE, 16 * PAGE)
    assert found.zero_chunks == [True, False, False, False]
    assert found.segments == [
        (0, 20 * PAGE, True),
        (20 * PAGE, 25 * PAGE, False),  # the 3 zero pages stay inside the data
        (25 * PAGE, 41 * PAGE, True),
        (41 * PAGE, 64 * PAGE, False),
    ]
    every_page = scan(buf, len(buf), 16 * PAGE, PAGE)
    zero_pages = sum(e - s for s, e, z in every_page.segments if z) // PAGE
    assert zero_pages == pages.count("Z")
    assert scan(buf, len(buf), 16 * PAGE, None).segments == []


def test_a_copy_with_its_holes_filled_is_the_same_image(tmp_path: Path, state_dir: int) -> None:
    blocks = _mixed_blocks(random.Random(9))
    before = blocks.hashes()
    info = _save(state_dir, "snap", blocks)
    dense = tmp_path / "dense"
    dense.write_bytes(_path(tmp_path, "snap").read_bytes())  # zeros written out as data
    assert dense.stat().st_blocks * 512 >= info.file_length
    assert _verify_path(dense) == info
    blocks.scribble()
    fd = os.open(dense, os.O_RDONLY)
    try:
        load(fd, info, blocks.write, blocks.zero)
    finally:
        os.close(fd)
    assert blocks.hashes() == before
