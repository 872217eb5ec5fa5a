"""A request that cannot get memory is answered, and the connection goes on (issue 21,
point 9: a ram-block-write at the address-space or mapping limit closed the connection
without an answer). Real daemon under a real ``RLIMIT_AS``, its address space filled by a
block's reservation so that a few MiB are left."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from daemon import Daemon, Raw

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
LIMIT = 4 * GiB


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_reads_and_writes_without_memory_are_answered(tmp_path: Path, loop: str) -> None:
    wrap = ["prlimit", f"--as={LIMIT}", "--"]
    d = Daemon(tmp_path, f"[limits]\nmax-reserved = {LIMIT}\n", "--event-loop", loop, wrap=wrap)
    try:
        with Raw(d.path, timeout=60) as rpc:
            rpc.call("ram-block-add", id="a", size=4 * MiB)
            assert rpc.call("query-version")  # what a request needs is in place
            left = 2 * MiB
            fill = (LIMIT - _vm_size(d.pid) - left) // PAGE * PAGE
            rpc.call("ram-block-add", id="fill", size=PAGE, **{"max-size": fill})
            data = base64.b64encode(b"\xa5" * 4 * MiB).decode()
            for request in (
                {"method": "ram-block-write", "params": {"id": "a", "offset": 0, "data": data}},
                {"method": "ram-block-read", "params": {"id": "a", "offset": 0, "length": 4 * MiB}},
            ):
                rpc.send(json.dumps({"jsonrpc": "2.0", "id": 1, **request}).encode())
                answer = rpc.reply()
                assert "error" in answer, str(answer)[:300]
                assert answer["error"]["message"] == "Cannot allocate memory for this request"
                assert rpc.call("query-version")  # the same connection goes on
            written = rpc.call("ram-block-write", id="a", offset=8, data="AQID")
            assert written == {"written": 3}
            rpc.call("ram-block-del", id="fill")
            assert rpc.call("ram-block-write", id="a", offset=0, data=data) == {"written": 4 * MiB}
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
    assert "out of memory" not in d.log_text()
