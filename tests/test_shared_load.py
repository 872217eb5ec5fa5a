"""The acceptance load of issue 21: 32 client processes drive shared blocks at once (add,
resize, del, get-fd and mapping, acknowledgements, put-fd, write/read round trips, save and
load of their own blocks; see ``shared_load_client.py``), every mapper touching its whole
mapped range after every event. Afterwards: no client died of SIGBUS, every request was
answered, none with -32603, every byte read back as modelled, and the daemon is alive.
``pytest -s`` prints the figures.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LOOPS
from daemon import Daemon, Raw
from shared_load_run import run_load, table

CLIENTS = 32
SECONDS = 20.0


@pytest.mark.parametrize("loop", LOOPS)
def test_32_clients_share_blocks_without_sigbus_loss_or_mismatch(
    start_daemon: Callable[..., Daemon], loop: str
) -> None:
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    try:
        d = start_daemon(
            f'memory-dir = "{parent}/mem"\n[limits]\nack-timeout = 30\nmax-connections = 1024\n',
            "--event-loop",
            loop,
        )
        result = run_load(d.path, clients=CLIENTS, seconds=SECONDS, seed=21)
        print("\n" + table(result, f"shared load on {loop}"))
        zeros = result.zeros()
        assert zeros == dict.fromkeys(zeros, 0), table(result, loop)
        assert d.alive(), d.log_text()[-3000:]
        # the load did something of every kind, and the daemon still answers
        for kind in ("add", "resize", "del", "get_fd", "put_fd", "write_read", "save", "load"):
            assert result.ops.get(kind, 0) > 0, kind
        assert result.counts["acks"] > 0 and result.counts["pages touched"] > 0
        assert result.outcomes.get("ram-load job ok", 0) > 0
        with Raw(d.path) as rpc:  # every client's connections go
            deadline = time.monotonic() + 20
            while rpc.call("query-stats")["clients"] > 1:
                assert time.monotonic() < deadline, "client connections left"
                time.sleep(0.02)
        log = d.log_text()
        assert " Traceback" not in log
        assert "did not acknowledge" not in log  # every mapper acknowledged in time
    finally:
        shutil.rmtree(parent)
