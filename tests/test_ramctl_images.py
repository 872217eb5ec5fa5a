"""``ramctl``'s rough edges of issue 24, each as a user of ``qemu-img``, ``virsh`` or
``systemctl`` expects: images listed and removed (``query-images``, ``image-remove``),
``save`` that reports and refuses to replace, ``jobs cancel|dismiss``, ``--mode``, image
names checked, sizes of refusals in powers of 1024, timeouts that say the command may still
complete, an ``add`` retried after one, and the prealloc indicator. Real daemon, real
``ramctl`` subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

from daemon import Daemon, Raw, wait_job
from ramctl_support import RAMCTL, jok, ok, ramctl

MiB = 1 << 20


def test_save_reports_and_refuses_to_replace_without_force(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    s = start_daemon().path
    ok(s, "add", "a", "1M", "--max-size", "4M")
    ok(s, "add", "b", "2M")
    ok(s, "write", "b", "0", input=os.urandom(64 * 1024))
    out = ok(s, "save", "img", "a", "b")
    assert re.fullmatch(
        r"saved 2 blocks \(a, b\), 3 MiB, \d+(\.\d+)? KiB on disk, to image 'img' in the "
        r"daemon's state-dir in \d+\.\d s\n",
        out,
    ), out
    image = tmp_path / "state" / "img"
    first = image.stat()
    (entry,) = jok(s, "images")
    assert entry["disk-size"] == first.st_blocks * 512 >= 64 * 1024  # zero pages are holes
    assert entry["disk-size"] < MiB and entry["size"] == first.st_size >= 3 * MiB
    p = ramctl(s, "save", "img", "a")
    assert p.returncode == 1 and p.stdout == b""
    err = p.stderr.decode()
    assert err.startswith("ramctl: ImageExists: image 'img' exists (2 blocks (a, b), "), err
    assert "use --force to replace it" in err
    assert image.stat().st_ino == first.st_ino  # untouched
    doc = jok(s, "save", "img", "a", "--force")
    assert doc["status"] == "concluded" and doc["image"]["blocks"] == ["a"]
    assert image.stat().st_ino != first.st_ino
    assert ok(s, "load", "img").startswith("loaded image 'img' (")


def test_images_are_listed_and_removed_never_through_a_symlink(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    s = start_daemon().path
    ok(s, "add", "a", "1M")
    ok(s, "save", "one")
    ok(s, "save", "two")
    state = tmp_path / "state"
    (state / "junk").write_bytes(b"not an image")
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    (state / "link").symlink_to(outside)
    assert ok(s, "images", "--name") == "junk\none\ntwo\n"
    table = ok(s, "images").splitlines()
    assert table[0].split() == ["NAME", "DATA", "ON-DISK", "MODIFIED", "BLOCKS", "ERROR"]
    assert table[2].split()[:3] == ["one", "1", "MiB"]
    assert table[2].split()[-1] == "a"
    assert table[1].startswith("junk") and "Bad image" in table[1]
    listed = jok(s, "images")
    assert [(i["name"], i["blocks"], i["data-bytes"]) for i in listed[1:]] == [
        ("one", ["a"], MiB),
        ("two", ["a"], MiB),
    ]
    assert listed[0]["blocks"] is None and listed[0]["size"] == len(b"not an image")
    assert abs(listed[1]["mtime"] - (state / "one").stat().st_mtime) < 1e-3
    assert ok(s, "rm-image", "one", "junk") == "removed image 'one'\nremoved image 'junk'\n"
    assert sorted(p.name for p in state.iterdir()) == ["link", "two"]
    p = ramctl(s, "rm-image", "link")
    assert p.returncode == 1
    assert p.stderr == b"ramctl: GenericError: Image 'link' is not a regular file: not removed\n"
    assert outside.read_bytes() == b"keep me" and (state / "link").is_symlink()
    p = ramctl(s, "rm-image", "one")
    assert p.returncode == 1 and p.stderr == b"ramctl: GenericError: Image 'one' not found\n"
    assert jok(s, "rm-image", "two") == {"removed": ["two"]}
    assert ok(s, "images", "--name") == ""


def test_image_names_are_checked_by_ramctl_and_by_the_daemon(any_daemon: Daemon) -> None:
    s = any_daemon.path
    for cmd in (["save", "../etc/x"], ["load", ".hidden"], ["rm-image", "a/b"]):
        p = ramctl(s, *cmd)
        assert p.returncode == 2, p.stderr
        line = p.stderr.decode().splitlines()[-1]
        assert line == (
            f"ramctl {cmd[0]}: error: argument NAME: invalid image name {cmd[1]!r}: images live "
            "in the daemon's state-dir, named by a letter or digit, then up to 63 of "
            "A-Z a-z 0-9 . _ - (no paths)"
        )
    with Raw(s) as r:
        for method, field in (("ram-save", "target"), ("ram-load", "source")):
            err = r.error(method, **{field: {"file": "../etc/x"}})
            assert err["code"] == -32602
            assert err["message"] == (
                f"{field}: invalid image name '../etc/x': a letter or digit, "
                "then up to 63 of A-Z a-z 0-9 . _ - (no paths)"
            )
            err = r.error(method, **{field: {"file": "a", "fd": "b"}})
            assert "\n" not in err["message"]
            assert err["message"].startswith(f'{field}: must be {{"file": NAME}}')
            assert err["message"].endswith(
                'or {"fd": FDNAME} (a file descriptor passed with getfd)'
            )
        err = r.error("image-remove", file="../x")
        assert err["code"] == -32602 and "file" in err["message"]


def test_only_full_access_peers_remove_images(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = start_daemon('log-level = "info"\n')
    ok(d.path, "add", "a", "1M")
    ok(d.path, "save", "img")
    mark = d.log_text()
    (tmp_path / "ramd.toml").write_text(f'log-level = "info"\nreadonly-uids = [{os.getuid()}]\n')
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.log_text().count("configuration reloaded") <= mark.count("configuration reloaded"):
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.02)
    assert ok(d.path, "images", "--name") == "img\n"
    p = ramctl(d.path, "rm-image", "img")
    assert p.returncode == 1
    assert p.stderr == (
        b"ramctl: GenericError: Permission denied: read-only peer may not run 'image-remove'\n"
    )
    assert (tmp_path / "state" / "img").exists()


def test_jobs_cancel_and_dismiss(start_daemon: Callable[..., Daemon]) -> None:
    s = start_daemon().path
    ok(s, "add", "big", "1G")
    jid = ok(s, "save", "big", "--no-wait").strip()
    p = ramctl(s, "jobs", "cancel", jid)
    assert p.returncode in (0, 1), p.stderr  # 1: it concluded before the cancel arrived
    if p.returncode == 0:
        assert (
            p.stdout.decode()
            == f"asked job {jid} to stop (`ramctl jobs` shows when it concluded)\n"
        )
    with Raw(s) as r:
        job = wait_job(r, jid)
    assert job["status"] == "concluded"
    assert ok(s, "jobs", "--name") == f"{jid}\n"
    assert ok(s, "jobs", "dismiss", jid) == f"dismissed job {jid}\n"
    assert ok(s, "jobs", "--name") == ""
    p = ramctl(s, "jobs", "dismiss", jid)
    assert p.returncode == 1 and b"not found" in p.stderr.lower()
    p = ramctl(s, "jobs", "cancel")
    assert (
        p.returncode == 2 and p.stderr == b"ramctl: jobs cancel: JOB expected (see `ramctl jobs`)\n"
    )
    p = ramctl(s, "jobs", "stop", jid)
    assert p.returncode == 2 and b"invalid choice: 'stop'" in p.stderr


def _mapper(path: Path, block: str) -> Raw:
    """A connection that maps ``block`` (its fd discarded) and acknowledges nothing."""
    r = Raw(path)
    r.call("ram-block-get-fd", id=block)
    return r


def test_mode_hard_releases_what_safe_keeps(start_daemon: Callable[..., Daemon]) -> None:
    s = start_daemon("[limits]\nack-timeout = 0.5\n").path
    ok(s, "add", "m", "8M", "--max-size", "16M", "--backend", "memfd")
    with _mapper(s, "m"):
        p = ramctl(s, "resize", "m", "4M")
        assert p.returncode == 1
        assert (
            p.stderr
            == b"ramctl: GenericError: Timed out waiting for 1 mapper(s) of RAM block 'm'\n"
        )
        assert jok(s, "info", "m")["size"] == 8 * MiB
        assert jok(s, "resize", "m", "4M", "--mode", "hard")["size"] == 4 * MiB
    with _mapper(s, "m"):
        assert ramctl(s, "del", "m").returncode == 1
        assert ok(s, "del", "m", "--mode=hard") == "removed m\n"
    assert jok(s, "list") == []


def test_a_timeout_says_the_command_may_still_complete(
    start_daemon: Callable[..., Daemon],
) -> None:
    s = start_daemon("[limits]\nack-timeout = 120\n").path
    ok(s, "add", "m", "8M", "--backend", "memfd")
    with _mapper(s, "m") as mapper:
        p = ramctl(s, "--timeout", "1", "del", "m")
        assert p.returncode == 3
        lines = p.stderr.decode().splitlines()
        assert lines[0] == f"ramctl: ram-block-del: no answer from ramd within 1 s (at {s})"
        assert lines[1:] == [
            "ramctl: the daemon may still complete ram-block-del: it is not cancelled; "
            "check with `ramctl info m`",
            "ramctl: wait longer with --timeout SECONDS (0: no limit)",
        ]
        p = ramctl(s, "--json", "--timeout", "1", "del", "m")  # busy meanwhile: refused
        assert p.returncode == 1 and b"busy" in p.stderr
        event = mapper.line()
        assert isinstance(event, dict) and event["method"] == "RAM_BLOCK_REMOVED"
        mapper.call("ram-block-ack", seq=event["params"]["data"]["seq"])
    # it did complete, as the message said it might
    p = ramctl(s, "info", "m")
    assert p.returncode == 1 and p.stderr == b"ramctl: DeviceNotFound: RAM block 'm' not found\n"


def test_an_add_retried_says_whether_the_first_one_made_it(any_daemon: Daemon) -> None:
    s = any_daemon.path
    ok(s, "add", "vm1", "3M", "--max-size", "1G")
    p = ramctl(s, "add", "vm1", "3M", "--max-size", "1G")
    assert p.returncode == 1
    assert p.stderr.decode().splitlines() == [
        "ramctl: GenericError: RAM block 'vm1' already exists",
        "ramctl: vm1 exists with the size and settings asked (3 MiB, anonymous): an earlier "
        "add, one that timed out perhaps, created it; `ramctl info vm1` shows it",
    ]
    p = ramctl(s, "add", "vm1", "4M")
    assert p.stderr.decode().splitlines()[1] == (
        "ramctl: vm1 exists with other settings (3 MiB of 1 GiB, anonymous): "
        "`ramctl info vm1` shows it"
    )
    p = ramctl(s, "--json", "add", "vm1", "3M", "--max-size", "1G")
    err = json.loads(p.stderr)["error"]
    assert err["desc"] == "RAM block 'vm1' already exists" and "earlier add" in err["hints"][0]


def test_refusals_show_their_sizes_in_powers_of_1024(
    start_daemon: Callable[..., Daemon],
) -> None:
    s = start_daemon("[limits]\nmax-used = 1073741824\n").path
    ok(s, "add", "vm1", "1M", "--max-size", "1G")
    p = ramctl(s, "resize", "vm1", "4G")
    assert p.stderr == (
        b"ramctl: GenericError: Size too large: vm1: 0x100000000 > 0x40000000: Invalid argument"
        b" (4 GiB > 1 GiB)\n"
    )
    p = ramctl(s, "add", "vm2", "1G")
    assert p.stderr == (
        b"ramctl: GenericError: Limit exceeded: max-used is 1073741824: 1048576 used, "
        b"1073741824 more asked (max-used is 1 GiB: 1 MiB used, 1 GiB more asked)\n"
    )
    p = ramctl(s, "--json", "resize", "vm1", "4G")
    desc = json.loads(p.stderr)["error"]["desc"]
    assert desc == "Size too large: vm1: 0x100000000 > 0x40000000: Invalid argument"
    p = ramctl(s, "del", "vm9")  # no size: nothing added
    assert p.stderr == b"ramctl: DeviceNotFound: RAM block 'vm9' not found\n"


def _on_a_terminal(cmd: list[str]) -> tuple[int, bytes]:
    """Run ``cmd`` with stderr on a pseudo-terminal; its status and what it showed there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    shown = b""
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave
        )
        os.close(slave)
        slave = -1
        while select.select([master], [], [], 60)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        return proc.wait(60), shown
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)


def test_a_prealloc_shows_what_it_waits_for_on_a_terminal_only(any_daemon: Daemon) -> None:
    s = str(any_daemon.path)
    status, shown = _on_a_terminal([*RAMCTL, "--socket", s, "add", "big", "64M", "--prealloc"])
    assert status == 0
    assert re.search(rb"add big: preallocating 64 MiB \[00:\d\d\]", shown), shown
    p = ramctl(s, "add", "big2", "64M", "--prealloc", "--lock")
    assert p.returncode == 0 and p.stderr == b""  # not a terminal: no line
    assert jok(s, "info", "big2")["prealloc"] is True


def test_list_and_info_show_backend_persistence_and_mappers(any_daemon: Daemon) -> None:
    s = any_daemon.path
    ok(s, "add", "m", "1M", "--backend", "memfd")
    with _mapper(s, "m"):
        row = ok(s, "list").splitlines()[1].split()
        assert row[0] == "m" and row[7:9] == ["memfd", "1"]
        info = ok(s, "info", "m")
        assert "\nbackend:     memfd\n" in info and "\nmappers:     1\n" in info
        assert "\nshared:      yes\n" in info and "\npersistent:  no\n" in info
    assert ok(s, "list", "--name") == "m\n"
    assert {"ram-block-add", "ram-block-del"} <= set(ok(s, "commands").split())
    assert {"query-images", "image-remove"} <= set(ok(s, "commands").split())


def test_holder_fields_are_shown_when_reported_and_absent_otherwise() -> None:
    """``leases``, ``sealed`` and ``holders`` (docs/protocol.md §12, §14) come with newer daemons
    and models: shown when the block has them, left out (no column, no line) when not."""
    from pydantic import BaseModel
    from ramd_client.cli_output import block_details, block_table

    from ramd.api import models as m

    class Holder(BaseModel):
        kind: str
        pid: int
        uid: int

    class Newer(m.RamBlockInfo):
        leases: int
        sealed: bool
        holders: list[Holder]

    plain = dict(
        id="vm1", size=MiB, max_size=MiB, resizable=False, page_size=4096, offset=0,
        backend="memfd", shared=True, persistent=False, prealloc=False, merge=False,
        dump=True, hugepages=False, hugetlb=False, lock=False, mappers=1,
    )  # fmt: skip
    old = m.RamBlockInfo.model_validate(plain)
    new = Newer.model_validate(
        {**plain, "leases": 2, "sealed": True, "holders": [{"kind": "lease", "pid": 7, "uid": 0}]}
    )
    assert "LEASES" not in block_table([old])  # no block has a lease
    if "leases" not in m.RamBlockInfo.model_fields:  # a daemon without leases
        assert "leases:" not in block_details(old)
    header, row = block_table([new]).splitlines()
    assert header.split()[4:7] == ["BACKEND", "MAPPERS", "LEASES"]
    assert row.split()[6:9] == ["memfd", "1", "2"] and row.split()[-1] == "sealed"
    details = block_details(new)
    assert "\nleases:      2\n" in details and "\nsealed:      yes\n" in details
    assert "\nholders:     lease pid 7 uid 0\n" in details


def test_ramctl_checks_image_names_by_the_daemons_rule() -> None:
    """The parser keeps its own copy of the rule (importing the image library would slow
    every ``ramctl`` start): it must be the daemon's."""
    from ramd_client.cli_parser import IMAGE_NAME_PATTERN

    from ramd.api.models import FileTarget
    from ramd.snapshot.files import NAME_PATTERN

    assert f"^{IMAGE_NAME_PATTERN}$" == NAME_PATTERN
    assert FileTarget.model_json_schema()["properties"]["file"]["pattern"] == NAME_PATTERN


def test_timeout_hints_name_what_goes_on() -> None:
    """Which commands the timeout message says may still complete, and how to check (the
    message itself is checked with a real daemon above)."""
    import argparse

    from ramd_client.cli_errors import timeout_hints

    def hints(command: str, method: str, **kw: str) -> list[str]:
        return timeout_hints(argparse.Namespace(command=command, **kw), method)

    wait = "wait longer with --timeout SECONDS (0: no limit)"
    assert hints("add", "ram-block-add", id="vm1") == [
        "the daemon may still complete ram-block-add: it is not cancelled; "
        "check with `ramctl info vm1`",
        wait,
    ]
    assert hints("list", "query-ram-blocks") == [wait]  # a query changes nothing
    # save follows its job with query-jobs: the job goes on whichever call timed out
    assert hints("save", "query-jobs", name="img")[0].startswith("the save job goes on")
    assert "`ramctl images`" in hints("rm-image", "image-remove")[0]
