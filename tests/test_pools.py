"""Pools (docs/protocol.md §14): ``[[pool]]`` blocks made ready in worker threads, taken with
``ram-block-add {id, pool}``, charged against ``max-used``, never recycled. Real daemon."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import procfs
import pytest
from daemon import Daemon, Raw

PAGE = 4096
MiB = 1 << 20
RAMD = [sys.executable, "-m", "ramd"]

POOLS = """
[[pool]]
name = "vm"
size = "4M"
count = 2

[[pool]]
name = "anon"
size = "1M"
count = 1
backend = "anonymous"
"""


def _pools(rpc: Raw) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in rpc.call("query-pools")}


def _until_ready(rpc: Raw, timeout: float = 180.0) -> None:
    """Until every pool holds ``count`` ready blocks (refills run at nice 19: on a busy
    machine they take their time)."""
    deadline = time.monotonic() + timeout
    while any(p["ready"] < p["count"] for p in _pools(rpc).values()):
        assert time.monotonic() < deadline, _pools(rpc)
        time.sleep(0.02)


def _read_all(rpc: Raw, block: str, size: int) -> bytes:
    data = rpc.call("ram-block-read", id=block, offset=0, length=size)["data"]
    return base64.b64decode(data)


def test_pools_are_ready_invisible_and_charged(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(POOLS)
    with Raw(d.path) as rpc:
        _until_ready(rpc)
        assert rpc.call("query-pools") == [
            {"name": "vm", "size": 4 * MiB, "count": 2, "ready": 2},
            {"name": "anon", "size": MiB, "count": 1, "ready": 1},
        ]
        assert rpc.call("query-ram-blocks") == []
        stats = rpc.call("query-stats")
        assert (stats["blocks"], stats["used"], stats["pooled"]) == (0, 0, 9 * MiB)

        info = rpc.call("ram-block-add", id="b1", pool="vm")
        assert (info["id"], info["size"], info["backend"], info["prealloc"]) == (
            "b1",
            4 * MiB,
            "memfd",
            True,
        )
        # every page of it is there already (allocated in a worker thread, before the ask)
        assert rpc.call("query-ram-blocks", id="b1", resident=True)[0]["resident"] == 4 * MiB
        anon = rpc.call("ram-block-add", id="a1", pool="anon")
        assert (anon["backend"], anon["size"]) == ("anonymous", MiB)
        assert rpc.call("query-ram-blocks", id="a1", resident=True)[0]["resident"] == MiB
        assert [b["id"] for b in rpc.call("query-ram-blocks")] == ["b1", "a1"]
        _until_ready(rpc)  # refilled in the background, charged again
        stats = rpc.call("query-stats")
        assert (stats["blocks"], stats["used"], stats["pooled"]) == (2, 5 * MiB, 9 * MiB)


def test_a_block_from_a_pool_never_holds_an_earlier_users_data(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon(POOLS)
    with Raw(d.path) as rpc:
        _until_ready(rpc)
        secret = base64.b64encode(b"secret of an earlier user" * 1000).decode()
        for round_ in range(5):  # more rounds than blocks in the pool: refilled blocks too
            for pool, size in (("vm", 4 * MiB), ("anon", MiB)):
                block = f"{pool}{round_}"
                rpc.call("ram-block-add", id=block, pool=pool)
                assert _read_all(rpc, block, size) == bytes(size), (pool, round_)
                rpc.call("ram-block-write", id=block, offset=0, data=secret)
                rpc.call("ram-block-write", id=block, offset=size - 25000, data=secret)
                rpc.call("ram-block-del", id=block)
            _until_ready(rpc)


def test_a_memfd_pool_block_is_made_of_transparent_huge_pages(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Where the kernel collapses shmem into huge pages (even with shmem THP ``never``), a
    memfd pool fills its blocks with them (docs/templates.md): each whole 2 MiB of the block
    is one huge page, mapped by one PMD in the daemon's view; the tail is small pages. A
    VMM that maps the block 2 MiB-aligned maps them the same way (tests/test_clones.py)."""
    if not procfs.shmem_collapse_works():
        pytest.skip("this kernel does not collapse a memfd into a huge page (MADV_COLLAPSE)")
    d = start_daemon('[[pool]]\nname = "vm"\nsize = "9M"\ncount = 1\n')
    with Raw(d.path) as rpc:
        _until_ready(rpc)
        info = rpc.call("ram-block-add", id="b", pool="vm")
        assert info["host"] % (2 * MiB) == 0
        vma = next(m for m in procfs.mappings(d.pid) if m.start == info["host"])
        assert vma.name.startswith("/memfd:ramd:pool:vm:")
        assert (vma.sizes["Rss"], vma.sizes["ShmemPmdMapped"]) == (9 * MiB, 8 * MiB)
        for offset in range(0, 9 * MiB, 4 * MiB):  # io-chunk: 4 MiB a read
            length = min(4 * MiB, 9 * MiB - offset)
            data = rpc.call("ram-block-read", id="b", offset=offset, length=length)["data"]
            assert base64.b64decode(data) == bytes(length)
        # a page discarded inside a huge page reads back as zeros, its neighbours kept
        rpc.call(
            "ram-block-write", id="b", offset=0, data=base64.b64encode(b"x" * 3 * PAGE).decode()
        )
        assert rpc.call("ram-block-discard", id="b", offset=PAGE, length=PAGE) == {}
        data = base64.b64decode(
            rpc.call("ram-block-read", id="b", offset=0, length=3 * PAGE)["data"]
        )
        assert data == b"x" * PAGE + bytes(PAGE) + b"x" * PAGE


def test_an_empty_pool_answers_at_once_and_refills_when_room_is_back(
    start_daemon: Callable[..., Daemon],
) -> None:
    """With ``max-used`` exactly the pool's charge, a taken block's charge cannot be given
    back to the pool: it stays short (and says so at once) until that block is deleted."""
    d = start_daemon('[limits]\nmax-used = "8M"\n[[pool]]\nname = "vm"\nsize = "4M"\ncount = 2\n')
    with Raw(d.path) as rpc:
        _until_ready(rpc)
        rpc.call("ram-block-add", id="a", pool="vm")
        rpc.call("ram-block-add", id="b", pool="vm")
        err = rpc.error("ram-block-add", id="c", pool="vm")
        assert (err["message"], err["data"]) == ("Pool 'vm' is empty", {"class": "GenericError"})
        assert "max-used" in rpc.error("ram-block-add", id="c", size=PAGE)["message"]
        stats = rpc.call("query-stats")
        assert (stats["used"], stats["pooled"]) == (8 * MiB, 0)
        assert _pools(rpc)["vm"]["ready"] == 0
        rpc.call("ram-block-del", id="a")
        deadline = time.monotonic() + 180
        while _pools(rpc)["vm"]["ready"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stats = rpc.call("query-stats")
        assert (stats["used"], stats["pooled"]) == (4 * MiB, 4 * MiB)
        assert _pools(rpc)["vm"]["ready"] == 1  # bounded by max-used: not two
        rpc.call("ram-block-add", id="c", pool="vm")


def test_ram_block_add_from_a_pool_takes_only_an_id(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as rpc:
        assert rpc.call("query-pools") == []
        err = rpc.error("ram-block-add", id="x", pool="nope")
        assert (err["message"], err["data"]) == ("Pool 'nope' not found", {"class": "GenericError"})
        for extra in ({"size": MiB}, {"max-size": MiB}, {"backend": "memfd"}):
            err = rpc.error("ram-block-add", id="x", pool="nope", **extra)
            assert err["data"] == {"class": "GenericError"}
            assert "takes only 'id'" in err["message"]
        err = rpc.error("ram-block-add", id="x")
        assert (err["code"], err["message"]) == (-32602, "size: Field required")
        assert rpc.call("query-stats")["pooled"] == 0


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ('[[pool]]\nname = "p"\nsize = "1M"\ncount = 65\n', "pool[0].count"),
        ('[[pool]]\nname = "p"\nsize = "1M"\ncount = 0\n', "pool[0].count"),
        ('[[pool]]\nname = "p"\nsize = "1M"\n', "pool[0].count"),
        ('[[pool]]\nname = "p"\nsize = "1M"\ncount = 1\nbackend = "file"\n', "pool[0].backend"),
        ('[[pool]]\nname = "p"\nsize = "2M"\ncount = 1\nmax-size = "1M"\n', "pool[0]"),
        ('[[pool]]\nname = "p"\nsize = "1M"\ncount = 1\nhugetlb = true\nbackend = "anonymous"\n',
         "pool[0]"),
        ('[[pool]]\nname = "1p"\nsize = "1M"\ncount = 1\n', "pool[0].name"),
        ('[[pool]]\nname = "p"\nsize = "1M"\ncount = 1\n[[pool]]\nname = "p"\nsize = "1M"\n'
         'count = 1\n', "pool 'p' is defined twice"),
        ('[limits]\nmax-used = "8M"\n[[pool]]\nname = "small"\nsize = "4M"\ncount = 1\n'
         '[[pool]]\nname = "big"\nsize = "4M"\ncount = 2\n', "pool[1]: pool 'big'"),
    ],
)  # fmt: skip
def test_bad_pool_config_exits_2_naming_it(tmp_path: Path, config: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(config)
    res = subprocess.run(
        [*RAMD, "--socket", str(tmp_path / "s.sock"), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 2, res.stderr
    assert key in res.stderr
    assert not (tmp_path / "s.sock").exists()
