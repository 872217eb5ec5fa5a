"""Memory defaults that hold the host: max-reserved from the address space, max-used from
RAM + swap or the memory cgroup, prealloc and lock checked against the cgroup and
RLIMIT_MEMLOCK before memory is touched. The cgroups here are real, created and removed by
the tests; the daemon runs inside them."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw

PAGE = 4096
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


# -- a memory cgroup made by the test ----------------------------------------------------


class MemoryCgroup:
    """A child of this process's own memory cgroup (v2 if it has the memory controller,
    else v1) with ``limit`` bytes; removed on :meth:`remove`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        found = self._locate()
        if found is None:
            pytest.skip("no memory cgroup (v1 memory controller or v2 with memory) here")
        self.version, parent = found
        self.dir = parent / f"ramd-test-{os.getpid()}-{time.monotonic_ns()}"
        try:
            self.dir.mkdir()
        except OSError as e:
            pytest.skip(f"cannot create a memory cgroup under {parent}: {e}")
        try:
            if self.version == 2:
                (self.dir / "memory.max").write_text(str(limit))
                (self.dir / "memory.swap.max").write_text("0")
            else:
                (self.dir / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            self.dir.rmdir()
            pytest.skip(f"cannot set the limit of {self.dir}: {e}")

    @staticmethod
    def _locate() -> tuple[int, Path] | None:
        own: dict[str, str] = {}
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else ["unified"]:
                own[c] = path
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            mounts.append((fields[sep + 1], fields[sep + 3].split(","), fields[3], fields[4]))
        for fstype, _opts, root, mountpoint in mounts:
            if fstype == "cgroup2" and "unified" in own:
                d = Path(mountpoint) / os.path.relpath(own["unified"], root)
                controllers = (d / "cgroup.subtree_control").read_text().split()
                if "memory" in controllers:
                    return 2, d
        for fstype, opts, root, mountpoint in mounts:
            if fstype == "cgroup" and "memory" in opts and "memory" in own:
                return 1, Path(mountpoint) / os.path.relpath(own["memory"], root)
        return None

    @property
    def limit_name(self) -> str:
        return "cgroup memory.max" if self.version == 2 else "cgroup memory.limit_in_bytes"

    def wrap(self) -> list[str]:
        """A command prefix that moves the process into this cgroup, then execs the rest."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.dir / "cgroup.procs")]

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.dir / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        for _ in range(100):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"cannot remove {self.dir}")


@pytest.fixture
def cgroup_2g() -> Iterator[MemoryCgroup]:
    if os.getuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    cg = MemoryCgroup(2 * GiB)
    yield cg
    cg.remove()


def _fill(rpc: Raw, block: str, size: int) -> None:
    """Write every byte of ``block`` (4 MiB per request, the default io-chunk)."""
    chunk = 4 * MiB
    data = base64.b64encode(b"\xa5" * chunk).decode()
    for offset in range(0, size, chunk):
        rpc.call("ram-block-write", id=block, offset=offset, data=data)


def test_cgroup_limit_refuses_grows_prealloc_lock_and_the_daemon_survives(
    tmp_path: Path, cgroup_2g: MemoryCgroup
) -> None:
    # max-used far above the cgroup, so the cgroup check is the one that refuses.
    d = Daemon(tmp_path, '[limits]\nmax-used = "64G"\n', wrap=cgroup_2g.wrap())
    refused = f"Limit exceeded: {cgroup_2g.limit_name} is {2 * GiB}: cgroup /"
    try:
        assert str(d.pid) in (cgroup_2g.dir / "cgroup.procs").read_text().split()
        with Raw(d.path, timeout=120) as rpc:
            assert rpc.call("query-stats")["limits"]["max-used"] == 64 * GiB
            rpc.call("ram-block-add", id="r", size=64 * MiB, **{"max-size": 8 * GiB})
            rpc.call("ram-block-add", id="l", size=64 * MiB, lock=True, **{"max-size": 4 * GiB})
            for method, params in [
                ("ram-block-resize", {"id": "r", "size": 3 * GiB}),
                ("ram-block-add", {"id": "big", "size": 3 * GiB, "prealloc": True}),
                ("ram-block-add", {"id": "big", "size": 3 * GiB, "lock": True}),
                ("ram-block-resize", {"id": "l", "size": 3 * GiB}),
            ]:
                err = rpc.error(method, params)
                assert err["data"] == {"class": "GenericError"}
                assert err["message"].startswith(refused), err
            pre = rpc.call("ram-block-add", id="p", size=GiB, prealloc=True)
            assert pre["size"] == GiB and pre["prealloc"]
            err = rpc.error("ram-block-resize", id="r", size=GiB)
            assert err["message"].startswith(refused), err
            rpc.call("ram-block-resize", id="r", size=512 * MiB)
            _fill(rpc, "r", 512 * MiB)
            err = rpc.error("ram-block-write", id="r", offset=512 * MiB, data="AA==")
            assert err["message"].startswith("Range out of bounds")
            blocks = {b["id"]: b for b in rpc.call("query-ram-blocks", resident=True)}
            assert blocks["r"]["resident"] == 512 * MiB
            assert blocks["l"]["resident"] == 64 * MiB and blocks["p"]["resident"] == GiB
            stats = rpc.call("query-stats")
            assert stats["used"] == GiB + 512 * MiB + 64 * MiB
        assert d.alive()
        assert cgroup_2g.oom_kills() == 0
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]


def test_prealloc_and_lock_must_fit_what_the_cgroup_has_now(
    tmp_path: Path, cgroup_2g: MemoryCgroup
) -> None:
    """Another process of the cgroup holds 1 GiB: a 1 GiB prealloc or lock would make the
    kernel kill someone, so it is refused; the max-used default comes from the cgroup."""
    hog = subprocess.Popen(
        [
            *cgroup_2g.wrap(),
            sys.executable,
            "-c",
            "import sys, time; m = b'\\x01' * (1 << 30); print('ready', flush=True);"
            " time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert hog.stdout is not None and hog.stdout.readline() == b"ready\n"
        d = Daemon(tmp_path, "", wrap=cgroup_2g.wrap())
        try:
            with Raw(d.path, timeout=60) as rpc:
                max_used = rpc.call("query-stats")["limits"]["max-used"]
                assert GiB < max_used < 2 * GiB - 64 * MiB
                for params in (
                    {"id": "p", "size": GiB, "prealloc": True},
                    {"id": "p", "size": GiB, "lock": True},
                ):
                    err = rpc.error("ram-block-add", params)
                    assert err["data"] == {"class": "GenericError"}
                    assert err["message"].startswith(
                        f"Limit exceeded: {cgroup_2g.limit_name} is {2 * GiB}: cgroup /"
                    ), err
                    assert "available now" in err["message"]
                rpc.call("ram-block-add", id="r", size=PAGE, **{"max-size": 4 * GiB})
                err = rpc.error("ram-block-resize", id="r", size=2 * GiB)
                assert err["message"].startswith(f"Limit exceeded: max-used is {max_used}")
                assert rpc.call("ram-block-add", id="small", size=64 * MiB, prealloc=True)
            assert d.alive() and hog.poll() is None
            assert cgroup_2g.oom_kills() == 0
        finally:
            assert d.stop() == 0, d.log_text()[-3000:]
    finally:
        hog.kill()
        hog.wait()


# -- address space and rlimits -----------------------------------------------------------


def test_address_space_default_refuses_cleanly(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    with Raw(d.path) as rpc:
        limit = rpc.call("query-stats")["limits"]["max-reserved"]
        assert limit == 64 * TiB
        added = 0
        while True:
            resp = rpc.request("ram-block-add", id=f"a{added}", size=PAGE, **{"max-size": 16 * TiB})
            if "error" in resp:
                break
            added += 1
            assert added < 8, "never refused"
        assert added == 3
        assert resp["error"]["data"] == {"class": "GenericError"}
        assert resp["error"]["message"].startswith(f"Limit exceeded: max-reserved is {limit}:")
        # The daemon still has the memory to answer large messages.
        rpc.call("ram-block-resize", id="a0", size=4 * MiB)
        _fill(rpc, "a0", 4 * MiB)
        data = rpc.call("ram-block-read", id="a0", offset=0, length=4 * MiB)["data"]
        assert base64.b64decode(data) == b"\xa5" * (4 * MiB)
        assert rpc.call("query-stats")["reserved"] == 3 * (16 * TiB + PAGE)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
def test_rlimit_as_halves_the_address_space_default(tmp_path: Path) -> None:
    wrap = ["prlimit", f"--as={16 * GiB}", "--"]
    d = Daemon(tmp_path, "", wrap=wrap)
    try:
        with Raw(d.path) as rpc:
            assert rpc.call("query-stats")["limits"]["max-reserved"] == 8 * GiB
            err = rpc.error("ram-block-add", id="a", size=PAGE, **{"max-size": 9 * GiB})
            assert err["message"].startswith(f"Limit exceeded: max-reserved is {8 * GiB}")
    finally:
        assert d.stop() == 0


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None or shutil.which("prlimit") is None,
    reason="needs root, setpriv and prlimit",
)
def test_lock_without_cap_ipc_lock_is_bounded_by_rlimit_memlock(tmp_path: Path) -> None:
    memlock = 8 * MiB
    wrap = [
        "prlimit",
        f"--memlock={memlock}",
        "setpriv",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
        "--no-new-privs",
        "--",
    ]
    d = Daemon(tmp_path, "", wrap=wrap)
    refused = f"Limit exceeded: RLIMIT_MEMLOCK is {memlock}:"
    try:
        assert "CapEff:\t0000000000000000" in Path(f"/proc/{d.pid}/status").read_text()
        with Raw(d.path) as rpc:
            err = rpc.error("ram-block-add", id="big", size=16 * MiB, lock=True)
            assert err["data"] == {"class": "GenericError"}
            assert err["message"].startswith(refused), err
            rpc.call("ram-block-add", id="a", size=4 * MiB, lock=True)
            rpc.call("ram-block-add", id="r", size=MiB, lock=True, **{"max-size": 64 * MiB})
            err = rpc.error("ram-block-resize", id="r", size=8 * MiB)
            assert err["message"].startswith(refused), err
            assert rpc.call("ram-block-resize", id="r", size=2 * MiB)["size"] == 2 * MiB
            # Unlocked blocks are not bounded by it.
            rpc.call("ram-block-add", id="plain", size=64 * MiB, prealloc=True)
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
