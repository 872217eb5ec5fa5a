"""The image library's I/O helpers on real threads and files: the write/hash pipeline (order,
bound, errors, close), page-aligned buffers, write-behind, and a load whose ``write`` fails."""

from __future__ import annotations

import ctypes
import os
import random
import threading
from pathlib import Path

import pytest

from ramd.errors import RamdError
from ramd.snapshot import (
    ImageCancelled,
    ReadFn,
    atomic_target,
    load,
    open_state_dir,
    verify,
    write_image,
)
from ramd.snapshot.buffer import AlignedBuffer, ring_for
from ramd.snapshot.fileio import WriteBehind
from ramd.snapshot.format import BlockDescriptor
from ramd.snapshot.pipeline import Pipeline

PAGE = 4096
MiB = 1024 * 1024
WAIT = 60  # seconds: generous, the machine is shared


def test_pipeline_consumes_in_order_with_at_most_depth_in_flight() -> None:
    seen: list[int] = []
    release = threading.Event()
    first = threading.Event()

    def consume(item: int) -> None:
        first.set()
        assert release.wait(WAIT)
        seen.append(item)

    with Pipeline(consume, 2, "test-pipeline") as p:
        p.put(0)
        assert first.wait(WAIT)
        p.put(1)  # in flight: 0 (being consumed) and 1
        blocked = threading.Thread(target=p.put, args=(2,))
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive()  # a third must wait
        release.set()
        blocked.join(WAIT)
        assert not blocked.is_alive()
        for i in range(3, 50):
            p.put(i)
        p.drain()
    assert seen == list(range(50))


def test_pipeline_reraises_the_consumer_error_in_the_producer() -> None:
    def consume(item: int) -> None:
        if item == 3:
            raise RamdError(f"cannot take {item}")

    with Pipeline(consume, 1, "test-pipeline") as p:
        with pytest.raises(RamdError, match=r"^cannot take 3$"):
            for i in range(100):
                p.put(i)
        with pytest.raises(RamdError, match=r"^cannot take 3$"):
            p.drain()


def test_pipeline_close_drops_queued_items_and_ends_the_thread() -> None:
    seen: list[int] = []
    gate = threading.Event()
    started = threading.Event()

    def consume(item: int) -> None:
        started.set()
        assert gate.wait(WAIT)
        seen.append(item)

    p = Pipeline(consume, 3, "test-pipeline")
    for i in range(3):
        p.put(i)
    assert started.wait(WAIT)
    gate.set()
    p.close()
    p.close()  # idempotent
    assert seen[0] == 0 and seen == list(range(len(seen)))  # the one being consumed finished
    assert all(t.name != "test-pipeline" for t in threading.enumerate())


def test_pipeline_refuses_a_depth_below_one() -> None:
    with pytest.raises(ValueError):
        Pipeline(lambda item: None, 0, "test-pipeline")


def test_buffers_are_page_aligned_and_bounded() -> None:
    for size in (PAGE, 256 * 1024, 2 * MiB):
        buf = AlignedBuffer(size)
        assert len(buf.view) == size
        assert ctypes.addressof(ctypes.c_char.from_buffer(buf.view)) % PAGE == 0
        buf.view[-1:] = b"x"
        assert buf.raw[buf.start + size - 1] == ord("x")
    assert ring_for(256 * 1024, MiB, 3).depth == 2
    big = ring_for(64 * MiB, MiB, 3)  # an image may ask for 64 MiB chunks: only two of them
    assert (big.size, big.depth) == (64 * MiB, 1)


def test_write_behind_leaves_the_file_as_written(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(8 * MiB)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        behind = WriteBehind(fd, 2 * MiB, 3 * MiB)
        for off in range(0, len(data), MiB):
            os.pwrite(fd, data[off : off + MiB], off)
            behind.written(off, MiB)
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data


def _blocks(rng: random.Random) -> tuple[list[bytearray], list[BlockDescriptor]]:
    """Two blocks much larger than the pipeline's buffers: random, and mostly zero."""
    sizes = [24 * MiB, 40 * MiB]
    data = [bytearray(s) for s in sizes]
    data[0][:] = rng.randbytes(sizes[0])
    for _ in range(64):
        off = rng.randrange(sizes[1] // PAGE) * PAGE
        data[1][off : off + PAGE] = rng.randbytes(PAGE)
    descs = [
        BlockDescriptor(f"b{i}", s, s, False, PAGE, "anonymous", {}) for i, s in enumerate(sizes)
    ]
    return data, descs


def _reader(data: list[bytearray]) -> ReadFn:
    def read(index: int, offset: int, buf: memoryview) -> None:
        buf[:] = data[index][offset : offset + len(buf)]

    return read


def test_a_durable_save_round_trips_through_many_buffers(tmp_path: Path) -> None:
    data, descs = _blocks(random.Random(2))
    expect = [bytes(d) for d in data]

    def write(index: int, offset: int, view: memoryview) -> None:
        data[index][offset : offset + len(view)] = view

    def zero(index: int, offset: int, length: int) -> None:
        data[index][offset : offset + length] = bytes(length)

    dir_fd = open_state_dir(str(tmp_path / "state"))
    try:
        with atomic_target(dir_fd, "img") as fd:
            info = write_image(fd, descs, _reader(data), durable=True)
    finally:
        os.close(dir_fd)
    fd = os.open(tmp_path / "state" / "img", os.O_RDONLY)
    try:
        assert verify(fd) == info
        for d in data:
            d[:] = b"\x5a" * len(d)
        load(fd, info, write, zero)
    finally:
        os.close(fd)
    assert [bytes(d) for d in data] == expect
    assert os.stat(tmp_path / "state" / "img").st_blocks * 512 < 26 * MiB  # holes kept


def test_a_failing_write_stops_the_load_with_its_error(tmp_path: Path) -> None:
    data, descs = _blocks(random.Random(3))
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        info = write_image(fd, descs, _reader(data))
    finally:
        os.close(fd)
    calls: list[int] = []

    def write(index: int, offset: int, view: memoryview) -> None:
        calls.append(offset)
        if len(calls) == 2:
            raise RamdError("Cannot write RAM block 'b0': its file was shortened")

    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(RamdError, match="its file was shortened"):
            load(fd, info, write, lambda i, o, n: None)
    finally:
        os.close(fd)
    assert len(calls) == 2  # nothing was written after the failure
    assert all(t.name != "ramd-image-read" for t in threading.enumerate())


def test_a_cancelled_load_passes_on_everything_it_read_first(tmp_path: Path) -> None:
    data, descs = _blocks(random.Random(4))
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        info = write_image(fd, descs, _reader(data))
    finally:
        os.close(fd)
    progress: list[int] = []
    written: list[int] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ImageCancelled):
            load(
                fd,
                info,
                lambda i, o, view: written.append(len(view)),
                lambda i, o, n: None,
                progress=progress.append,
                cancelled=lambda: len(progress) >= 3,
            )
    finally:
        os.close(fd)
    assert len(progress) == 3 and sum(written) == sum(progress)
