"""RAMList / RAMBlock against the real kernel: QEMU's resize semantics, settings, access."""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from procfs import PAGE, covering, mem_total_bytes, rss_bytes, swap_total_bytes

from ramd.errors import RamdError
from ramd.ramblock import RAMBlock, RAMList

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB


@pytest.fixture
def ram() -> Iterator[RAMList]:
    rl = RAMList()
    yield rl
    rl.close()


def _layout(block: RAMBlock) -> list[tuple[int, int, str]]:
    return [(m.start, m.end, m.perms) for m in covering(block.host, block.host + block.max_size)]


def test_one_tib_reservation_only_used_part_accessible(ram: RAMList) -> None:
    b = ram.add("big", 8 * MiB, TiB, align=GiB)
    assert b.resizable and b.size == 8 * MiB and b.max_size == TiB
    assert b.host % GiB == 0
    used = covering(b.host, b.host + b.size)
    assert [(m.start, m.end, m.perms) for m in used] == [(b.host, b.host + 8 * MiB, "rw-p")]
    tail = covering(b.host + b.size, b.host + b.max_size + PAGE)
    assert [(m.start, m.end, m.perms) for m in tail] == [
        (b.host + 8 * MiB, b.host + TiB + PAGE, "---p")
    ]
    assert "ac" not in tail[0].flags
    assert b.resident() == 0


def test_sizes_round_up_to_page_size(ram: RAMList) -> None:
    b = ram.add("r", 1, PAGE + 1)
    assert (b.size, b.max_size, b.page_size) == (PAGE, 2 * PAGE, PAGE)
    fixed = ram.add("f", 3 * PAGE - 7)
    assert (fixed.size, fixed.max_size, fixed.resizable) == (3 * PAGE, 3 * PAGE, False)


def test_write_read_shrink_grow_back_reads_zeros(ram: RAMList) -> None:
    ram.add("a", 4 * PAGE, 16 * PAGE)
    ram.write("a", 0, b"x" * (4 * PAGE))
    assert ram.read("a", PAGE, 3) == b"xxx"
    ram.resize("a", PAGE)
    ram.resize("a", 4 * PAGE)
    assert ram.read("a", 0, PAGE) == b"x" * PAGE
    assert ram.read("a", PAGE, 3 * PAGE) == bytes(3 * PAGE)


def test_shrink_releases_memory_at_once(ram: RAMList) -> None:
    b = ram.add("a", 256 * MiB, 512 * MiB)
    ctypes.memset(b.host, 1, b.size)
    assert b.resident() == 256 * MiB
    rss_before = rss_bytes()
    ram.resize("a", 16 * MiB)
    assert b.resident() == 16 * MiB
    assert rss_before - rss_bytes() >= 230 * MiB


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


def test_touching_past_size_is_sigsegv_and_below_is_fine(ram: RAMList) -> None:
    b = ram.add("a", 4 * PAGE, 64 * PAGE)
    ok = _child_touch(b.host + b.size - 1)
    assert os.WIFEXITED(ok) and os.WEXITSTATUS(ok) == 0
    bad = _child_touch(b.host + b.size)
    assert os.WIFSIGNALED(bad) and os.WTERMSIG(bad) == signal.SIGSEGV
    guard = _child_touch(b.host + b.max_size)
    assert os.WIFSIGNALED(guard) and os.WTERMSIG(guard) == signal.SIGSEGV
    ram.resize("a", 2 * PAGE)
    shrunk = _child_touch(b.host + 2 * PAGE)
    assert os.WIFSIGNALED(shrunk) and os.WTERMSIG(shrunk) == signal.SIGSEGV


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def added(self, block: RAMBlock) -> None:
        self.calls.append(("added", block.id))

    def removed(self, block: RAMBlock) -> None:
        self.calls.append(("removed", block.id))

    def resized(self, block: RAMBlock, old: int, new: int) -> None:
        self.calls.append(("resized", block.id, old, new))


def test_grow_beyond_ram_plus_swap_is_enomem_and_changes_nothing(ram: RAMList) -> None:
    rec = Recorder()
    ram.register_notifier(rec)
    b = ram.add("a", 2 * PAGE, 4 * TiB)
    ram.write("a", 0, b"keep me")
    rec.calls.clear()
    before = _layout(b)
    impossible = (mem_total_bytes() + swap_total_bytes()) * 2
    with pytest.raises(RamdError) as exc:
        ram.resize("a", impossible)
    assert exc.value.errno == errno.ENOMEM
    assert exc.value.error_class == "GenericError"
    assert exc.value.desc == f"Cannot grow a to 0x{impossible:x}: Cannot allocate memory"
    assert b.size == 2 * PAGE
    assert ram.read("a", 0, 7) == b"keep me"
    assert _layout(b) == before
    assert rec.calls == []


def test_resize_error_texts(ram: RAMList) -> None:
    ram.add("fixed", 4 * PAGE)
    ram.add("r", 4 * PAGE, 8 * PAGE)
    with pytest.raises(
        RamdError, match=r"^Size mismatch: fixed: 0x8000 != 0x4000: Invalid argument$"
    ):
        ram.resize("fixed", 8 * PAGE)
    with pytest.raises(RamdError) as exc:
        ram.resize("r", 9 * PAGE)
    assert str(exc.value) == "Size too large: r: 0x9000 > 0x8000: Invalid argument"
    # a max-size equal to the size still makes a resizable block (docs/protocol.md §5)
    assert ram.add("same", 4 * PAGE, 4 * PAGE).resizable
    with pytest.raises(RamdError) as exc:
        ram.resize("same", 5 * PAGE)
    assert str(exc.value) == "Size too large: same: 0x5000 > 0x4000: Invalid argument"
    assert ram.resize("same", PAGE).size == PAGE
    with pytest.raises(RamdError) as exc:
        ram.resize("nope", PAGE)
    assert (exc.value.error_class, exc.value.desc) == (
        "DeviceNotFound",
        "RAM block 'nope' not found",
    )
    with pytest.raises(RamdError) as exc:
        ram.add("r", PAGE)
    assert exc.value.error_class == "GenericError"
    assert "already exists" in exc.value.desc
    with pytest.raises(RamdError, match="prealloc is not supported for resizable blocks"):
        ram.add("p", PAGE, 2 * PAGE, prealloc=True)
    with pytest.raises(RamdError, match="Invalid RAM block id"):
        ram.add("9bad", PAGE)
    with pytest.raises(RamdError, match="Invalid align"):
        ram.add("odd", PAGE, align=3 * PAGE)
    with pytest.raises(RamdError, match="Size too large"):
        ram.add("small", 4 * PAGE, 2 * PAGE)


def test_noop_resize_calls_no_notifier(ram: RAMList) -> None:
    rec = Recorder()
    ram.register_notifier(rec)
    ram.add("a", 2 * PAGE, 8 * PAGE)
    ram.add("f", 2 * PAGE)
    rec.calls.clear()
    ram.resize("a", 2 * PAGE - 100)
    ram.resize("f", 2 * PAGE)
    assert rec.calls == []


class MappingInspector:
    """Records what the kernel shows for a block's range inside each callback."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int, str]] = []

    def added(self, block: RAMBlock) -> None:
        self.seen.append(("added", block.size, 0, covering(block.host, block.host + 1)[0].perms))

    def removed(self, block: RAMBlock) -> None:
        perms = covering(block.host, block.host + block.size)[0].perms
        self.seen.append(("removed", block.size, 0, perms))

    def resized(self, block: RAMBlock, old: int, new: int) -> None:
        top = max(old, new)
        perms = {m.perms for m in covering(block.host, block.host + top)}
        self.seen.append(("resized", old, new, ",".join(sorted(perms))))
        assert block.size == top


def test_notifier_order_grow_maps_first_shrink_releases_after(ram: RAMList) -> None:
    insp = MappingInspector()
    ram.register_notifier(insp)
    b = ram.add("a", 2 * PAGE, 16 * PAGE)
    ram.resize("a", 8 * PAGE)
    ram.resize("a", 4 * PAGE)
    host = b.host
    ram.remove("a")
    assert insp.seen == [
        ("added", 2 * PAGE, 0, "rw-p"),
        ("resized", 2 * PAGE, 8 * PAGE, "rw-p"),
        ("resized", 8 * PAGE, 4 * PAGE, "rw-p"),
        ("removed", 4 * PAGE, 0, "rw-p"),
    ]
    assert covering(host, host + 16 * PAGE) == []


def test_register_replays_added_in_creation_order(ram: RAMList) -> None:
    for name in ("c", "a", "b"):
        ram.add(name, PAGE, 2 * PAGE)
    rec = Recorder()
    ram.register_notifier(rec)
    assert rec.calls == [("added", "c"), ("added", "a"), ("added", "b")]
    assert [b.id for b in ram] == ["c", "a", "b"]


class LegacyNotifier:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def added(self, block: RAMBlock) -> None:
        self.calls.append(block.id)

    def removed(self, block: RAMBlock) -> None:
        self.calls.append("-" + block.id)


def test_safety_net_refuses_legacy_notifier_with_resizable_blocks(ram: RAMList) -> None:
    ram.add("r", PAGE, 2 * PAGE)
    with pytest.raises(RamdError, match="without resize support"):
        ram.register_notifier(LegacyNotifier())
    assert len(ram.notifiers) == 0


def test_safety_net_refuses_resizable_block_while_legacy_notifier(ram: RAMList) -> None:
    legacy = LegacyNotifier()
    ram.add("f", PAGE)
    ram.register_notifier(legacy)
    assert legacy.calls == ["f"]
    with pytest.raises(RamdError, match="does not support resizing"):
        ram.add("r", PAGE, 2 * PAGE)
    assert "r" not in ram
    ram.unregister_notifier(legacy)
    ram.add("r", PAGE, 2 * PAGE)


def test_raising_notifier_is_logged_and_others_still_run(
    ram: RAMList, caplog: pytest.LogCaptureFixture
) -> None:
    class Boom(Recorder):
        def resized(self, block: RAMBlock, old: int, new: int) -> None:
            raise RuntimeError("boom")

    rec = Recorder()
    ram.register_notifier(Boom())
    ram.register_notifier(rec)
    ram.add("a", PAGE, 4 * PAGE)
    ram.resize("a", 2 * PAGE)
    assert ram.get("a").size == 2 * PAGE
    assert rec.calls[-1] == ("resized", "a", PAGE, 2 * PAGE)
    assert "boom" in caplog.text


def test_prealloc_makes_every_page_resident(ram: RAMList) -> None:
    b = ram.add("p", 64 * MiB, prealloc=True)
    assert b.resident() == b.size


def test_discard_zeroes_and_releases(ram: RAMList) -> None:
    b = ram.add("d", 16 * PAGE)
    ram.write("d", 0, b"\xff" * (16 * PAGE))
    assert b.resident() == 16 * PAGE
    ram.discard("d", 4 * PAGE, 8 * PAGE)
    assert b.resident() == 8 * PAGE
    assert ram.read("d", 4 * PAGE, 8 * PAGE) == bytes(8 * PAGE)
    assert ram.read("d", 3 * PAGE, PAGE) == b"\xff" * PAGE
    with pytest.raises(RamdError, match="Unaligned discard range"):
        ram.discard("d", 1, PAGE)
    with pytest.raises(RamdError, match="Unaligned discard range"):
        ram.discard("d", 0, PAGE + 1)
    with pytest.raises(RamdError, match="Range out of bounds"):
        ram.discard("d", 8 * PAGE, 16 * PAGE)
    with pytest.raises(RamdError, match="Range out of bounds"):
        ram.discard("d", -PAGE, PAGE)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (0, -1), (2**63, 1), (1, 2**64), (4 * 4096, 1), (4 * 4096 - 1, 2), (2**64, 2**64)],
)
def test_out_of_range_access_is_refused(ram: RAMList, offset: int, length: int) -> None:
    ram.add("a", 4 * 4096, 64 * 4096)
    with pytest.raises(RamdError, match="Range out of bounds"):
        ram.read("a", offset, length)
    if length >= 0 and length < 2**20:
        with pytest.raises(RamdError, match="Range out of bounds"):
            ram.write("a", offset, b"z" * length)


def test_offsets_best_fit_gap(ram: RAMList) -> None:
    a = ram.add("a", PAGE, 4 * PAGE)
    b = ram.add("b", PAGE, 2 * PAGE)
    c = ram.add("c", PAGE, 8 * PAGE)
    d = ram.add("d", PAGE, 2 * PAGE)
    assert (a.offset, b.offset, c.offset, d.offset) == (0, 4 * PAGE, 6 * PAGE, 14 * PAGE)
    ram.remove("a")
    ram.remove("c")
    e = ram.add("e", PAGE, 3 * PAGE)
    assert e.offset == 0
    f = ram.add("f", PAGE, 5 * PAGE)
    assert f.offset == 6 * PAGE
    g = ram.add("g", PAGE, 9 * PAGE)
    assert g.offset == 16 * PAGE
    spans = sorted((x.offset, x.offset + x.max_size) for x in ram)
    assert all(s1[1] <= s2[0] for s1, s2 in itertools.pairwise(spans))


def test_settings_reach_the_vma_flags_including_grown_parts(ram: RAMList) -> None:
    b = ram.add("s", 2 * MiB, 8 * MiB, merge=True, dump=False, hugepages=True, lock=True)
    assert b.host % (2 * MiB) == 0
    ram.resize("s", 6 * MiB)
    vmas = covering(b.host, b.host + b.size)
    assert vmas and all(m.perms == "rw-p" for m in vmas)
    for m in vmas:
        assert {"dd", "hg", "lo"} <= m.flags, m.flags
    if os.path.exists("/sys/kernel/mm/ksm"):
        assert all("mg" in m.flags for m in vmas)
    assert b.resident() == b.size


def test_remove_unmaps_and_close_frees_everything() -> None:
    rl = RAMList()
    a = rl.add("a", PAGE, TiB)
    f = rl.add("f", 4 * PAGE)
    rl.remove("a")
    assert covering(a.host, a.host + TiB + PAGE) == []
    rl.close()
    assert covering(f.host, f.host + 5 * PAGE) == []
    assert len(rl) == 0


def test_close_leaves_a_block_being_created_to_its_creator() -> None:
    rl = RAMList()
    pending = rl.create("p", 4 * PAGE, prealloc=True)
    with pytest.raises(RamdError, match="busy: it is being preallocated"):
        rl.get("p")
    rl.close()
    assert covering(pending.host, pending.host + PAGE)[0].perms == "rw-p"
    rl.abort(pending)
    assert covering(pending.host, pending.host + 5 * PAGE) == []


def test_discard_on_a_locked_block_zeroes_and_keeps_it_locked(ram: RAMList) -> None:
    b = ram.add("l", 8 * PAGE, lock=True)
    ram.write("l", 0, b"\xee" * (8 * PAGE))
    ram.discard("l", 2 * PAGE, 4 * PAGE)
    assert ram.read("l", 2 * PAGE, 4 * PAGE) == bytes(4 * PAGE)
    assert ram.read("l", 0, 2 * PAGE) == b"\xee" * (2 * PAGE)
    assert all("lo" in m.flags for m in covering(b.host, b.host + b.size))


def test_shared_block_notifier_order_keeps_file_and_mapping_until_after_notify(
    tmp_path: Path,
) -> None:
    """For a memfd block, inside ``resized`` (shrink) and ``removed`` the file still has the
    old length and the old range is still mapped shared; both are released only after."""
    seen: list[tuple[str, int, str]] = []

    class Inspector(Recorder):
        def resized(self, block: RAMBlock, old: int, new: int) -> None:
            perms = {m.perms for m in covering(block.host, block.host + max(old, new))}
            seen.append(("resized", os.fstat(block.fd).st_size, ",".join(sorted(perms))))

        def removed(self, block: RAMBlock) -> None:
            perms = {m.perms for m in covering(block.host, block.host + block.size)}
            seen.append(("removed", os.fstat(block.fd).st_size, ",".join(sorted(perms))))

    rl = RAMList(tmp_path / "mem")
    rl.register_notifier(Inspector())
    b = rl.add("m", 2 * PAGE, 16 * PAGE, backend="memfd")
    rl.resize("m", 8 * PAGE)
    rl.resize("m", 4 * PAGE)
    assert os.fstat(b.fd).st_size == 4 * PAGE
    assert covering(b.host + 4 * PAGE, b.host + 8 * PAGE)[0].perms == "---p"
    host = b.host
    rl.remove("m")
    assert seen == [
        ("resized", 8 * PAGE, "rw-s"),
        ("resized", 8 * PAGE, "rw-s"),
        ("removed", 4 * PAGE, "rw-s"),
    ]
    assert covering(host, host + 17 * PAGE) == [] and b.fd == -1
    rl.close()


@pytest.mark.parametrize("backend", ["anonymous", "memfd", "file"])
def test_block_facts_per_backend(tmp_path: Path, backend: str) -> None:
    rl = RAMList(tmp_path / "mem")
    b = rl.add("b", PAGE, backend=backend)  # type: ignore[arg-type]
    facts = (b.backend, b.shared, b.persistent, b.hugetlb, b.fd >= 0, b.path)
    path = str(tmp_path / "mem" / "b") if backend == "file" else None
    assert facts == (
        backend,
        backend != "anonymous",
        backend == "file",
        False,
        backend != "anonymous",
        path,
    )
    rl.write("b", 0, b"same behaviour")
    assert rl.read("b", 0, 14) == b"same behaviour"
    assert b.resident() == PAGE
    rl.remove("b")
    assert not (tmp_path / "mem" / "b").exists()
    rl.close()
